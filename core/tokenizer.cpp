// The encode path mirrors huggingface/tokenizers step by step (added_vocabulary.rs,
// normalizer.rs, models/bpe/{model,word}.rs, decoders/*) because "the same ids as HF" is the
// contract: the training data must tokenize exactly as it will at inference.
#include "core/tokenizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include "core/tensor.h"

namespace tl {

using nlohmann::json;

namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // "▁", SentencePiece's visible space
constexpr size_t kCacheMaxWord = 256, kCacheMaxEntries = 1 << 17;

// Byte length of the UTF-8 character at s[i]; 0 when s[i] does not start a valid one (a stray
// or truncated byte, an overlong form, a surrogate). Such a byte is then a unit of its own.
size_t utf8_len(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t n = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    auto d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (d & 0x3F);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}
size_t unit_len(std::string_view s, size_t i) { return std::max<size_t>(1, utf8_len(s, i)); }

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, SvHash, std::equal_to<>>;

uint64_t pair_key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }

enum class Split { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
struct Step {  // one normalizer, pre-tokenizer or decoder step
  enum Kind { Replace, Prepend, Split, ByteFallback, Fuse } kind;
  std::string pattern, content;
  tl::Split behavior = tl::Split::Isolated;
};
using Pieces = std::vector<std::pair<int32_t, uint32_t>>;  // (id, normalized byte length)

}  // namespace

std::optional<size_t> invalid_utf8_at(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    const size_t n = utf8_len(text, i);
    if (n == 0) return i;
    i += n;
  }
  return std::nullopt;
}

struct Tokenizer::Impl {
  std::string label;
  StrMap<int32_t> vocab;                 // the BPE model's vocab
  StrMap<int32_t> by_text;               // vocab + added tokens (added ones win, as in HF)
  std::vector<std::string> text_of;      // id -> token text
  std::vector<uint8_t> kind_of;          // id -> 0 no token, 1 vocab, 2 added, 3 added special
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a,b) -> (rank, new id)
  std::array<int32_t, 256> byte_id{};    // id of "<0xNN>", -1 when absent
  int32_t unk = -1;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false, split_at_space = false;
  std::unordered_map<uint64_t, int32_t> trie;  // added-token trie: (node << 8 | byte) -> child
  std::vector<int32_t> trie_id{-1};            // node -> added token id ending there, or -1
  std::array<bool, 256> starts_added{};        // bytes that begin some added token
  std::vector<Step> normalizer, pre_tokenizer, decoder;
  bool has_decoder = false;
  mutable std::mutex mu;
  mutable StrMap<Pieces> cache;

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw Error(fmt::format("{}: {}: {}", label, field, msg));
  }
  void parse(const json& root);
  void parse_model(const json& m);
  void parse_steps(const json& j, const std::string& field, std::vector<Step>& out, int what);
  void bpe(std::string_view word, Pieces& out) const;
  void merge_word(std::string_view word, Pieces& out) const;
  void encode_plain(std::string_view text, uint32_t base, std::vector<int32_t>& ids,
                    std::vector<Span>* spans) const;
};

namespace {
template <class T>
T get(const Tokenizer::Impl& t, const json& j, const char* key, const std::string& field, T dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    t.fail(field + "." + key, "has the wrong type (" + it->dump() + ")");
  }
}
}  // namespace

void Tokenizer::Impl::parse_model(const json& m) {
  if (!m.is_object()) fail("model", "missing or not an object");
  std::string type = get<std::string>(*this, m, "type", "model", "");
  if (type != "BPE") fail("model.type", "'" + type + "' is not supported (only BPE)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m[k].is_null()) fail(std::string("model.") + k, "is not supported");
  if (get(*this, m, "dropout", "model", 0.0) != 0.0)
    fail("model.dropout", "BPE dropout is not supported (it makes encoding random)");
  byte_fallback = get(*this, m, "byte_fallback", "model", false);
  fuse_unk = get(*this, m, "fuse_unk", "model", false);
  ignore_merges = get(*this, m, "ignore_merges", "model", false);
  auto v = m.find("vocab");
  if (v == m.end() || !v->is_object()) fail("model.vocab", "missing or not an object");
  for (auto& [tok, id] : v->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= INT32_MAX)
      fail("model.vocab", fmt::format("id of '{}' is not an integer in [0, 2^31)", tok));
    int32_t i = id.get<int32_t>();
    if (size_t(i) >= text_of.size()) text_of.resize(i + 1), kind_of.resize(i + 1);
    if (kind_of[i]) fail("model.vocab", fmt::format("id {} is used twice", i));
    text_of[i] = tok, kind_of[i] = 1, vocab[tok] = i;
  }
  if (std::string u = get<std::string>(*this, m, "unk_token", "model", ""); !u.empty()) {
    if (!vocab.count(u)) fail("model.unk_token", "'" + u + "' is not in the vocab");
    unk = vocab[u];
  }
  byte_id.fill(-1);
  for (int b = 0; b < 256; ++b)
    if (auto it = vocab.find(fmt::format("<0x{:02X}>", b)); it != vocab.end())
      byte_id[b] = it->second;
  auto ms = m.find("merges");
  if (ms == m.end() || !ms->is_array()) fail("model.merges", "missing or not an array");
  int32_t rank = 0;
  for (const json& e : *ms) {
    std::string a, b;
    if (e.is_string()) {  // the older "a b" form, split at its one space
      auto s = e.get<std::string>();
      if (s.rfind("#version", 0) == 0) continue;
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("model.merges", fmt::format("entry {} '{}' is not two tokens", rank, s));
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0], b = e[1];
    } else {
      fail("model.merges", fmt::format("entry {} is neither \"a b\" nor [\"a\", \"b\"]", rank));
    }
    for (const std::string& t : {a, b, a + b})
      if (!vocab.count(t))
        fail("model.merges", fmt::format("entry {}: '{}' is not in the vocab", rank, t));
    merges[pair_key(vocab[a], vocab[b])] = {rank++, vocab[a + b]};  // a pair twice: last wins
  }
  // When no token has "▁" right after another character, no merge can cross into a "▁": words
  // may then be cut before each run of "▁" and cached, with unchanged results.
  split_at_space = vocab.count(kSpace) && (unk < 0 || !text_of[unk].ends_with(kSpace));
  for (auto& [tok, id] : vocab)
    for (size_t p = tok.find(kSpace, 1); split_at_space && p != std::string::npos;
         p = tok.find(kSpace, p + 1))
      split_at_space = p >= 3 && tok.compare(p - 3, 3, kSpace) == 0;
}

// what: 0 normalizer, 1 pre-tokenizer, 2 decoder.
void Tokenizer::Impl::parse_steps(const json& j, const std::string& field, std::vector<Step>& out,
                                  int what) {
  if (j.is_null()) return;
  std::string type = j.is_object() ? get<std::string>(*this, j, "type", field, "") : "";
  auto literal = [&](const char* key) {
    auto p = j.find(key);
    if (p == j.end() || !p->is_object() || !p->contains("String") || !(*p)["String"].is_string())
      fail(field + "." + key, "only {\"String\": ...} patterns are supported (no Regex)");
    std::string s = (*p)["String"];
    if (s.empty()) fail(field + "." + key, "empty pattern");
    return s;
  };
  if (type == "Sequence") {
    const char* key = what == 0 ? "normalizers" : what == 1 ? "pretokenizers" : "decoders";
    auto list = j.find(key);
    if (list == j.end() || !list->is_array()) fail(field + "." + key, "missing or not an array");
    for (size_t i = 0; i < list->size(); ++i)
      parse_steps((*list)[i], fmt::format("{}.{}[{}]", field, key, i), out, what);
  } else if (type == "Replace" && what != 1) {
    std::string content = get<std::string>(*this, j, "content", field, "");
    out.push_back({Step::Replace, literal("pattern"), content});
  } else if (type == "Prepend" && what == 0) {
    out.push_back({Step::Prepend, "", get<std::string>(*this, j, "prepend", field, "")});
  } else if (type == "Split" && what == 1) {
    if (get(*this, j, "invert", field, false)) fail(field + ".invert", "true is not supported");
    static const std::pair<const char*, Split> kB[] = {
        {"Removed", Split::Removed}, {"Isolated", Split::Isolated},
        {"MergedWithPrevious", Split::MergedWithPrevious},
        {"MergedWithNext", Split::MergedWithNext}, {"Contiguous", Split::Contiguous}};
    std::string b = get<std::string>(*this, j, "behavior", field, "");
    auto it = std::find_if(std::begin(kB), std::end(kB), [&](auto& p) { return b == p.first; });
    if (it == std::end(kB)) fail(field + ".behavior", "'" + b + "' is not a Split behavior");
    out.push_back({Step::Split, literal("pattern"), "", it->second});
  } else if ((type == "ByteFallback" || type == "Fuse") && what == 2) {
    out.push_back({type == "Fuse" ? Step::Fuse : Step::ByteFallback, "", ""});
  } else {
    fail(field, "type '" + (j.is_object() ? type : j.dump()) + "' is not supported");
  }
}

void Tokenizer::Impl::parse(const json& root) {
  if (!root.is_object()) fail("(root)", "not a JSON object");
  for (const char* k : {"truncation", "padding"})
    if (root.contains(k) && !root[k].is_null()) fail(k, "must be null (it would change encode)");
  parse_model(root.contains("model") ? root["model"] : json());
  const json& added = root.contains("added_tokens") ? root["added_tokens"] : json::array();
  if (!added.is_array()) fail("added_tokens", "not an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const json& a = added[i];
    std::string f = fmt::format("added_tokens[{}]", i);
    if (!a.is_object()) fail(f, "not an object");
    int64_t id = get<int64_t>(*this, a, "id", f, -1);
    std::string content = get<std::string>(*this, a, "content", f, "");
    if (id < 0 || id >= INT32_MAX || content.empty())
      fail(f, "needs an id >= 0 and a non-empty content");
    for (const char* k : {"single_word", "lstrip", "rstrip", "normalized"})
      if (get(*this, a, k, f, false)) fail(f + "." + k, "true is not supported");
    if (size_t(id) >= text_of.size()) text_of.resize(id + 1), kind_of.resize(id + 1);
    if (kind_of[id] == 1 && text_of[id] != content)
      fail(f, fmt::format("id {} is '{}' in the vocab", id, text_of[id]));
    text_of[id] = content, kind_of[id] = get(*this, a, "special", f, false) ? 3 : 2;
    int32_t node = 0;
    starts_added[uint8_t(content[0])] = true;
    for (unsigned char c : content) {
      auto [it, fresh] = trie.try_emplace(uint64_t(node) << 8 | c, int32_t(trie_id.size()));
      if (fresh) trie_id.push_back(-1);
      node = it->second;
    }
    trie_id[node] = int32_t(id);
  }
  for (size_t id = 0; id < text_of.size(); ++id)
    if (kind_of[id] == 1) by_text.emplace(text_of[id], int32_t(id));
  for (size_t id = 0; id < text_of.size(); ++id)
    if (kind_of[id] >= 2) by_text[text_of[id]] = int32_t(id);
  parse_steps(root.value("normalizer", json()), "normalizer", normalizer, 0);
  parse_steps(root.value("pre_tokenizer", json()), "pre_tokenizer", pre_tokenizer, 1);
  parse_steps(root.value("decoder", json()), "decoder", decoder, 2);
  has_decoder = !root.value("decoder", json()).is_null();
  // The post-processor only acts when special tokens are added, which encode() never does.
  json post = root.value("post_processor", json());
  if (!post.is_null() && (!post.is_object() || post.value("type", "") != "TemplateProcessing"))
    fail("post_processor", post.dump().substr(0, 60) + " is not supported (TemplateProcessing is)");
}

// tokenizers' BPE::merge_word + Word::merge_all: the lowest-ranked adjacent pair merges first
// (leftmost on ties). A queued pair is stale when its left symbol is gone or the pair now
// yields another id; like HF, only the new id is compared, not the rank.
void Tokenizer::Impl::merge_word(std::string_view w, Pieces& out) const {
  struct Sym {
    int32_t id, prev, next;
    uint32_t len;
  };
  std::vector<Sym> syms;
  auto add = [&](int32_t id, uint32_t len) {
    syms.push_back({id, int32_t(syms.size()) - 1, -1, len});
  };
  int32_t pend = -1;  // an unk not yet added (so that fuse_unk can grow it), and its length
  uint32_t pend_len = 0;
  for (size_t i = 0; i < w.size();) {
    size_t n = unit_len(w, i);
    std::string_view s = w.substr(i, n);
    i += n;
    if (auto it = vocab.find(s); it != vocab.end()) {
      if (pend >= 0) add(pend, pend_len), pend = -1;
      add(it->second, uint32_t(n));
      continue;
    }
    auto has_byte = [&](char c) { return byte_id[uint8_t(c)] >= 0; };
    if (byte_fallback && std::all_of(s.begin(), s.end(), has_byte)) {
      for (char c : s) add(byte_id[uint8_t(c)], 1);  // HF leaves a pending unk for later here
      continue;
    }
    if (unk < 0) fail("model.unk_token", fmt::format("none, and no token for '{}'", s));
    if (pend >= 0 && fuse_unk) {
      pend_len += uint32_t(n);
    } else {
      if (pend >= 0) add(pend, pend_len);
      pend = unk, pend_len = uint32_t(n);
    }
  }
  if (pend >= 0) add(pend, pend_len);
  for (size_t k = 0; k + 1 < syms.size(); ++k) syms[k].next = int32_t(k + 1);

  struct Cand {
    int32_t rank, pos, id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand> q;
  auto push = [&](int32_t pos) {
    if (pos < 0 || syms[pos].next < 0) return;
    auto it = merges.find(pair_key(syms[pos].id, syms[syms[pos].next].id));
    if (it != merges.end()) q.push({it->second.first, pos, it->second.second});
  };
  for (size_t k = 0; k + 1 < syms.size(); ++k) push(int32_t(k));
  while (!q.empty()) {
    Cand top = q.top();
    q.pop();
    Sym& s = syms[top.pos];
    if (s.len == 0 || s.next < 0) continue;
    Sym right = syms[s.next];
    auto it = merges.find(pair_key(s.id, right.id));
    if (it == merges.end() || it->second.second != top.id) continue;
    syms[s.next].len = 0;
    s.id = top.id, s.len += right.len, s.next = right.next;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    push(s.prev);
    push(top.pos);
  }
  for (const Sym& s : syms)
    if (s.len) out.emplace_back(s.id, s.len);
}

void Tokenizer::Impl::bpe(std::string_view word, Pieces& out) const {
  if (word.empty()) return;
  auto hit = ignore_merges ? vocab.find(word) : vocab.end();
  if (hit != vocab.end()) return out.emplace_back(hit->second, uint32_t(word.size())), void();
  auto one = [&](std::string_view w) {  // BPE through a cache of short words, as HF does
    if (w.size() >= kCacheMaxWord) return merge_word(w, out);
    {
      std::lock_guard lock(mu);
      if (auto it = cache.find(w); it != cache.end())
        return out.insert(out.end(), it->second.begin(), it->second.end()), void();
    }
    size_t first = out.size();
    merge_word(w, out);
    std::lock_guard lock(mu);
    if (cache.size() < kCacheMaxEntries)
      cache.emplace(std::string(w), Pieces(out.begin() + first, out.end()));
  };
  if (!split_at_space) return one(word);
  size_t start = 0;
  bool prev_space = true;
  for (size_t i = 0; i < word.size();) {
    bool space = word.compare(i, kSpace.size(), kSpace) == 0;
    if (space && !prev_space) one(word.substr(start, i - start)), start = i;
    prev_space = space;
    i += space ? kSpace.size() : unit_len(word, i);
  }
  one(word.substr(start));
}

// Normalize, pre-tokenize and BPE a stretch of text that holds no added token.
void Tokenizer::Impl::encode_plain(std::string_view text, uint32_t base,
                                   std::vector<int32_t>& ids, std::vector<Span>* spans) const {
  if (text.empty()) return;
  std::string norm(text);
  std::vector<uint32_t> at(norm.size() + 1);  // normalized byte -> byte of `text`
  for (size_t k = 0; k < at.size(); ++k) at[k] = uint32_t(k);
  for (const Step& st : normalizer) {
    if (st.kind == Step::Prepend) {
      if (norm.empty()) continue;
      uint32_t first = at[0];
      norm.insert(0, st.content), at.insert(at.begin(), st.content.size(), first);
      continue;
    }
    std::string out;
    std::vector<uint32_t> out_at;
    size_t pos = 0;
    for (size_t m; (m = norm.find(st.pattern, pos)) != std::string::npos;
         pos = m + st.pattern.size()) {
      out.append(norm, pos, m - pos);
      out_at.insert(out_at.end(), at.begin() + pos, at.begin() + m);
      out += st.content, out_at.insert(out_at.end(), st.content.size(), at[m]);
    }
    out.append(norm, pos), out_at.insert(out_at.end(), at.begin() + pos, at.end());
    norm = std::move(out), at = std::move(out_at);
  }
  // tokenizers' NormalizedString::split for each literal Split, on every piece so far.
  std::vector<std::pair<size_t, size_t>> pieces{{0, norm.size()}};
  for (const Step& st : pre_tokenizer) {
    std::vector<std::pair<size_t, size_t>> next;
    for (auto [b, e] : pieces) {
      std::vector<std::tuple<size_t, size_t, bool>> parts;  // (begin, end, is_match)
      size_t pos = b;
      std::string_view piece(norm.data(), e);  // offsets stay those of `norm`
      for (size_t m; (m = piece.find(st.pattern, pos)) != std::string::npos;
           pos = m + st.pattern.size()) {
        if (m > pos) parts.emplace_back(pos, m, false);
        parts.emplace_back(m, m + st.pattern.size(), true);
      }
      if (pos < e) parts.emplace_back(pos, e, false);
      std::vector<std::tuple<size_t, size_t, bool>> out;  // (begin, end, drop)
      bool prev_match = false, to_next = st.behavior == Split::MergedWithNext;
      bool merged = to_next || st.behavior == Split::MergedWithPrevious;
      if (to_next) std::reverse(parts.begin(), parts.end());  // HF folds MergedWithNext backwards
      for (auto [pb, pe, match] : parts) {
        bool join = !out.empty() && (st.behavior == Split::Contiguous
                                         ? match == prev_match : merged && match && !prev_match);
        if (join && to_next) std::get<0>(out.back()) = pb;
        else if (join) std::get<1>(out.back()) = pe;
        else out.emplace_back(pb, pe, match && st.behavior == Split::Removed);
        prev_match = match;
      }
      if (to_next) std::reverse(out.begin(), out.end());
      for (auto [ob, oe, drop] : out)
        if (!drop && oe > ob) next.emplace_back(ob, oe);
    }
    pieces = std::move(next);
  }
  Pieces toks;
  for (auto [b, e] : pieces) {
    toks.clear();
    bpe(std::string_view(norm).substr(b, e - b), toks);
    for (auto [id, len] : toks) {
      ids.push_back(id);
      if (spans) spans->push_back({base + at[b], base + at[b + len]});
      b += len;
    }
  }
}

Tokenizer Tokenizer::from_json_text(std::string_view text, const std::string& label) {
  auto impl = std::make_shared<Impl>();
  impl->label = label;
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", label, e.what()));
  }
  impl->parse(root);
  Tokenizer t;
  t.impl_ = std::move(impl);
  return t;
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open tokenizer file");
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), path);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  return encode(text, nullptr);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, std::vector<Span>* spans) const {
  const Impl& t = *impl_;
  std::vector<int32_t> ids;
  if (spans) spans->clear();
  size_t done = 0;
  // Added tokens first, leftmost-longest, on the raw text (all are normalized=false).
  for (size_t i = 0; i < text.size(); ++i) {
    if (!t.starts_added[uint8_t(text[i])]) continue;
    int32_t node = 0, id = -1;
    size_t end = 0;
    for (size_t k = i; k < text.size(); ++k) {
      auto it = t.trie.find(uint64_t(node) << 8 | uint8_t(text[k]));
      if (it == t.trie.end()) break;
      node = it->second;
      if (t.trie_id[node] >= 0) id = t.trie_id[node], end = k + 1;
    }
    if (id < 0) continue;
    t.encode_plain(text.substr(done, i - done), uint32_t(done), ids, spans);
    ids.push_back(id);
    if (spans) spans->push_back({uint32_t(i), uint32_t(end)});
    done = end, i = end - 1;
  }
  t.encode_plain(text.substr(done), uint32_t(done), ids, spans);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int32_t id : ids) toks.push_back(token(id));
  if (!impl_->has_decoder) return fmt::format("{}", fmt::join(toks, " "));
  for (const Step& st : impl_->decoder) {
    if (st.kind == Step::Replace) {
      for (std::string& s : toks)
        for (size_t p = 0; (p = s.find(st.pattern, p)) != std::string::npos; p += st.content.size())
          s.replace(p, st.pattern.size(), st.content);
    } else if (st.kind == Step::Fuse) {
      toks = {fmt::format("{}", fmt::join(toks, ""))};
    } else {  // ByteFallback: runs of "<0xNN>" become their bytes, or U+FFFD per byte if not UTF-8
      std::vector<std::string> out;
      std::string bytes;
      auto flush = [&] {
        if (bytes.empty()) return;
        size_t i = 0;
        while (i < bytes.size() && utf8_len(bytes, i)) i += utf8_len(bytes, i);
        if (i == bytes.size()) out.push_back(bytes);
        else out.insert(out.end(), bytes.size(), "\xEF\xBF\xBD");
        bytes.clear();
      };
      for (std::string& s : toks) {
        // "<0xNN>" read as Rust's u8::from_str_radix(s[3..5], 16), which also takes a '+'.
        bool form = s.size() == 6 && s.starts_with("<0x") && s.ends_with('>');
        bool plus = form && s[3] == '+';
        std::string_view h = form ? std::string_view(s).substr(plus ? 4 : 3, plus ? 1 : 2) : "";
        auto hex = [](char c) { return std::isxdigit(uint8_t(c)) != 0; };
        if (!h.empty() && std::all_of(h.begin(), h.end(), hex)) {
          bytes.push_back(char(std::stoi(std::string(h), nullptr, 16)));
        } else {
          flush();
          out.push_back(std::move(s));
        }
      }
      flush();
      toks = std::move(out);
    }
  }
  return fmt::format("{}", fmt::join(toks, ""));
}

std::optional<int32_t> Tokenizer::find_token(std::string_view token) const {
  auto it = impl_->by_text.find(token);
  return it == impl_->by_text.end() ? std::nullopt : std::optional(it->second);
}

int32_t Tokenizer::token_id(std::string_view token) const {
  if (auto id = find_token(token)) return *id;
  throw Error(fmt::format("{}: no token '{}'", impl_->label, token));
}

const std::string& Tokenizer::token(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->text_of.size() || !impl_->kind_of[id])
    throw Error(fmt::format("{}: id {} names no token", impl_->label, id));
  return impl_->text_of[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->kind_of.size() && impl_->kind_of[id] == 3;
}
int64_t Tokenizer::vocab_size() const { return int64_t(impl_->text_of.size()); }
const std::string& Tokenizer::label() const { return impl_->label; }

}  // namespace tl
