// The C++ tokenizer against the ids, decodes and variants that HF `tokenizers` produced
// (tests/golden/tokenizer/, written by scripts/golden/make_tokenizer_golden.py).
#include "core/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include <unistd.h>

#include "core/tensor.h"

namespace tl {
namespace {

using nlohmann::json;

std::string source(const std::string& rel) { return std::string(TL_SOURCE_DIR) + "/" + rel; }
std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
json golden(const std::string& name) { return json::parse(read_text(source("tests/golden/tokenizer/" + name))); }
const std::string kTiny = source("models/tiny/tokenizer.json");
const Tokenizer& tiny() {
  static const Tokenizer t = Tokenizer::load(kTiny);
  return t;
}

TEST(Tokenizer, TinyKeepsGemma4SpecialTokenIds) {
  const Tokenizer& t = tiny();
  EXPECT_EQ(t.vocab_size(), 4096);
  const std::pair<const char*, int> ids[] = {
      {"<pad>", 0}, {"<eos>", 1}, {"<bos>", 2}, {"<unk>", 3}, {"<mask>", 4}, {"<|tool>", 46},
      {"<tool|>", 47}, {"<|tool_call>", 48}, {"<tool_call|>", 49}, {"<|tool_response>", 50},
      {"<tool_response|>", 51}, {"<|\"|>", 52}, {"<|think|>", 98}, {"<|channel>", 100},
      {"<channel|>", 101}, {"<|turn>", 105}, {"<turn|>", 106}, {"\n", 107}, {"<|video|>", 4095}};
  for (auto [tok, id] : ids) EXPECT_EQ(t.token_id(tok), id) << tok;
  EXPECT_TRUE(t.is_special(106));
  EXPECT_FALSE(t.is_special(107));  // "\n" is an ordinary piece, as in Gemma 4
  EXPECT_EQ(t.token(108), "<0x00>");
  EXPECT_FALSE(t.find_token("<nope>"));
  EXPECT_THROW(t.token_id("<nope>"), Error);
  EXPECT_THROW(t.token(4096), Error);
  EXPECT_THROW(t.decode({-1}), Error);
}

TEST(Tokenizer, EncodeMatchesTokenizersOnEveryFixtureLine) {
  json cases = golden("encode.json");
  ASSERT_GT(cases.size(), 60u);
  for (const json& c : cases) {
    std::string text = c["text"];
    EXPECT_EQ(tiny().encode(text), c["ids"].get<std::vector<int32_t>>()) << text;
  }
}

TEST(Tokenizer, DecodeMatchesTokenizers) {
  for (const json& c : golden("encode.json"))
    EXPECT_EQ(tiny().decode(c["ids"].get<std::vector<int32_t>>()), c["decoded"].get<std::string>());
  for (const json& c : golden("decode.json"))
    EXPECT_EQ(tiny().decode(c["ids"].get<std::vector<int32_t>>()), c["text"].get<std::string>()) << c["ids"];
}

TEST(Tokenizer, DecodeOfEncodeGivesTheTextBack) {
  int checked = 0;
  for (const json& c : golden("encode.json")) {
    std::string text = c["text"];
    // A literal "▁" in the input comes back as a space (Gemma's decoder maps every "▁").
    if (text.find("\xE2\x96\x81") != std::string::npos) continue;
    EXPECT_EQ(tiny().decode(tiny().encode(text)), text);
    ++checked;
  }
  EXPECT_GT(checked, 60);
}

TEST(Tokenizer, SpansMapEachTokenBackToTheText) {
  for (const json& c : golden("encode.json")) {
    std::string text = c["text"];
    std::vector<Tokenizer::Span> spans;
    std::vector<int32_t> ids = tiny().encode(text, &spans);
    ASSERT_EQ(spans.size(), ids.size());
    uint32_t at = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      ASSERT_LE(spans[i].begin, spans[i].end);
      EXPECT_EQ(spans[i].begin, at) << text;  // contiguous, in order
      at = spans[i].end;
      std::string_view piece = std::string_view(text).substr(spans[i].begin, spans[i].end - spans[i].begin);
      if (tiny().is_special(ids[i])) {
        EXPECT_EQ(piece, tiny().token(ids[i]));
      }
    }
    EXPECT_EQ(at, text.size()) << text;
  }
}

// Other settings the loader accepts, each as a patch of the tiny tokenizer.json.
TEST(Tokenizer, VariantsMatchTokenizers) {
  json base = json::parse(read_text(kTiny));
  json file = golden("variants.json");
  std::vector<std::string> lines = file[0]["lines"];
  ASSERT_GE(file.size(), 10u);
  for (size_t v = 1; v < file.size(); ++v) {
    const json& var = file[v];
    std::string name = var["name"];
    Tokenizer t = Tokenizer::from_json_text(base.patch(var["patch"]).dump(), name);
    for (size_t i = 0; i < lines.size(); ++i) {
      std::vector<int32_t> ids = var["ids"][i];
      EXPECT_EQ(t.encode(lines[i]), ids) << name << ": " << lines[i];
      EXPECT_EQ(t.decode(ids), var["decoded"][i].get<std::string>()) << name << ": " << lines[i];
    }
  }
}

TEST(Tokenizer, StringMergesEqualArrayMerges) {
  json j = json::parse(read_text(kTiny));
  for (json& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  Tokenizer t = Tokenizer::from_json_text(j.dump(), "string-merges");
  for (const json& c : golden("encode.json")) EXPECT_EQ(t.encode(c["text"].get<std::string>()), c["ids"]);
}

TEST(Tokenizer, InvalidUtf8IsEncodedByteByByte) {
  const Tokenizer& t = tiny();
  auto byte = [&](int b) { return 108 + b; };  // <0x00> is id 108 in models/tiny
  EXPECT_EQ(t.encode("\xFF"), (std::vector<int32_t>{byte(0xFF)}));
  // A truncated 3-byte character and a lone continuation byte, between ASCII letters.
  std::vector<int32_t> ids = t.encode("a\xE2\x96z\x80");
  std::vector<int32_t> want = t.encode("a");
  want.insert(want.end(), {byte(0xE2), byte(0x96)});
  for (int32_t id : t.encode("z")) want.push_back(id);
  want.push_back(byte(0x80));
  EXPECT_EQ(ids, want);
  EXPECT_EQ(t.encode("\xC0\xAF"), (std::vector<int32_t>{byte(0xC0), byte(0xAF)}));  // overlong '/'
  EXPECT_EQ(t.encode("\xED\xA0\x80"), (std::vector<int32_t>{byte(0xED), byte(0xA0), byte(0x80)}));  // surrogate
  // Decoding follows tokenizers: bytes that are not UTF-8 become U+FFFD, one per byte.
  EXPECT_EQ(t.decode(t.encode("x\xFFy")), "x\xEF\xBF\xBDy");
}

TEST(Tokenizer, LongInputsAndThreads) {
  std::string para = golden("encode.json").back()["text"];  // three jargon paragraphs
  std::string big;
  while (big.size() < (1 << 20)) big += para + "\n\n";
  std::string word(200000, 'x');  // one 200 kB "word": BPE must not be quadratic
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids = tiny().encode(big);
  EXPECT_EQ(tiny().decode(ids), big);
  EXPECT_EQ(tiny().decode(tiny().encode(word)), word);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(s, 20.0);  // about 0.3 s at -O2; generous for sanitizer and debug builds
  std::vector<std::vector<int32_t>> got(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&, i] { got[i] = Tokenizer(tiny()).encode(big); });
  for (auto& th : threads) th.join();
  for (auto& g : got) EXPECT_EQ(g, ids);
}

// Every unsupported or broken field is an error naming the file and the field.
TEST(Tokenizer, MalformedFilesGiveClearErrors) {
  const json base = json::parse(read_text(kTiny));
  // Its own scratch directory, removed at the end (nothing left in the system's temp folder).
  const std::filesystem::path scratch =
      std::filesystem::temp_directory_path() / ("tl_tok_" + std::to_string(::getpid()));
  std::filesystem::create_directories(scratch);
  struct RemoveAtEnd {
    std::filesystem::path p;
    ~RemoveAtEnd() { std::filesystem::remove_all(p); }
  } remove_at_end{scratch};
  const std::string dir = scratch.string();
  auto expect_error = [&](const std::string& name, const std::string& text, const std::string& field) {
    std::string path = dir + "/tok_" + name + ".json";
    std::ofstream(path, std::ios::binary) << text;
    try {
      Tokenizer::load(path);
      ADD_FAILURE() << name << ": loaded without error";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(field), std::string::npos) << name << ": " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  };
  auto with = [&](const std::string& ptr, const json& value) {
    json j = base;
    j[json::json_pointer(ptr)] = value;
    return j.dump();
  };
  expect_error("not_json", "{\"model\": ", "not valid JSON");
  expect_error("array", "[1, 2]", "not a JSON object");
  expect_error("wordpiece", with("/model/type", "WordPiece"), "model.type");
  expect_error("no_model", [&] { json j = base; j.erase("model"); return j.dump(); }(), "model");
  expect_error("no_vocab", [&] { json j = base; j["model"].erase("vocab"); return j.dump(); }(), "model.vocab");
  expect_error("vocab_id", with("/model/vocab/hello", "x"), "model.vocab");
  expect_error("dup_id", with("/model/vocab/zzzz", 7), "model.vocab");
  expect_error("merge_unknown", with("/model/merges/0", json::array({"qqq", "t"})), "model.merges");
  expect_error("merge_form", with("/model/merges/0", "a b c"), "model.merges");
  expect_error("unk_missing", with("/model/unk_token", "<nope>"), "model.unk_token");
  expect_error("dropout", with("/model/dropout", 0.1), "model.dropout");
  expect_error("prefix", with("/model/continuing_subword_prefix", "##"), "model.continuing_subword_prefix");
  expect_error("nfkc", with("/normalizer", {{"type", "NFKC"}}), "normalizer");
  expect_error("regex", with("/normalizer/pattern", {{"Regex", " +"}}), "normalizer.pattern");
  expect_error("bytelevel", with("/pre_tokenizer", {{"type", "ByteLevel"}}), "pre_tokenizer");
  expect_error("invert", with("/pre_tokenizer/invert", true), "pre_tokenizer.invert");
  expect_error("behavior", with("/pre_tokenizer/behavior", "Sideways"), "pre_tokenizer.behavior");
  expect_error("strip", with("/decoder/decoders/3", {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}),
               "decoder.decoders[3]");
  expect_error("post", with("/post_processor", {{"type", "ByteLevel"}}), "post_processor");
  expect_error("truncation", with("/truncation", {{"max_length", 8}}), "truncation");
  expect_error("lstrip", with("/added_tokens/0/lstrip", true), "added_tokens[0].lstrip");
  expect_error("normalized", with("/added_tokens/3/normalized", true), "added_tokens[3].normalized");
  expect_error("added_clash", with("/added_tokens/0/content", "<other>"), "added_tokens[0]");
  expect_error("missing", "", "not valid JSON");
  std::string nowhere = dir + "/no/such/tokenizer.json";
  try {
    Tokenizer::load(nowhere);
    ADD_FAILURE() << "loaded a missing file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(nowhere), std::string::npos);
  }
}

}  // namespace
}  // namespace tl
