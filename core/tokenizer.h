// A Hugging Face `tokenizer.json` of Gemma's kind, re-implemented so that training needs no
// Python: BPE with byte fallback, literal Replace / Prepend normalizers, literal Split
// pre-tokenizers, added tokens matched before BPE, and the Replace / ByteFallback / Fuse
// decoder. encode() gives exactly the ids of `tokenizers` `encode(text,
// add_special_tokens=False)`; anything in the file it does not implement is refused with a
// tl::Error naming the file and the field, never approximated.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tl {

// The byte offset of the first byte of `text` that does not start a valid UTF-8 character (a
// stray or truncated byte, an overlong form, a surrogate), or nullopt when all of it is valid.
// JSON parsers report such a line as a syntax error somewhere in it; tools say this instead.
std::optional<size_t> invalid_utf8_at(std::string_view text);

class Tokenizer {
 public:
  // Reads a tokenizer.json. `label` names it in errors (defaults to the path).
  static Tokenizer load(const std::string& path);
  static Tokenizer from_json_text(std::string_view text, const std::string& label);

  // Token ids of `text`. No <bos> is added, as Gemma 4's tokenizer adds none; prepend it (id
  // token_id("<bos>")) yourself for raw text, not after a chat template (which writes it).
  // Bytes that are not valid UTF-8 are encoded one by one like characters absent from the
  // vocabulary (byte fallback), so every input has a deterministic encoding.
  std::vector<int32_t> encode(std::string_view text) const;

  // As encode(), plus for each token the byte range [begin, end) of `text` it came from (a
  // space turned into "▁" maps back to the space). Used to mask chat turns by position.
  struct Span {
    uint32_t begin, end;
  };
  std::vector<int32_t> encode(std::string_view text, std::vector<Span>* spans) const;

  // Text of `ids` through the file's decoder, special tokens included, as `tokenizers`
  // decode(ids, skip_special_tokens=False) gives it (byte tokens that do not form UTF-8 become
  // U+FFFD each). Unlike `tokenizers`, an id that names no token is an error, not skipped.
  std::string decode(const std::vector<int32_t>& ids) const;

  // Id of a token given by its text (special tokens such as "<|turn>", or any vocab entry).
  int32_t token_id(std::string_view token) const;  // throws tl::Error when absent
  std::optional<int32_t> find_token(std::string_view token) const;
  // Text of one token, as stored in the file (e.g. "▁the", "<0x0A>", "<turn|>").
  const std::string& token(int32_t id) const;
  bool is_special(int32_t id) const;

  // One past the largest id (262144 for Gemma 4; 4096 for models/tiny).
  int64_t vocab_size() const;
  const std::string& label() const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;  // shared: copies are cheap and share the word cache
};

}  // namespace tl
