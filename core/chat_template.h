// Gemma 4 chats rendered in C++, without a Jinja engine. The output is byte-identical to
// models/tiny/chat_template.jinja under transformers' apply_chat_template, which renders text
// chats exactly as Google's Gemma 4 chat_template.jinja does (checked by
// make_tokenizer_golden.py --check-against):
//
//   <bos>[<|turn>system\n[<|think|>\n]SYSTEM<turn|>\n]
//   <|turn>user\nTEXT<turn|>\n
//   <|turn>model\n[<|channel>thought\nREASONING\n<channel|>]ANSWER<turn|>\n ...
//   [<|turn>model\n]                                   (generation prompt)
//
// Text is trimmed (Python str.strip()); "assistant" is rendered as "model"; inline
// <|channel>…<channel|> blocks are removed from model text, and the `reasoning` of a model
// message is rendered only after the last user turn. Consecutive assistant messages share one
// model turn. Tools, tool calls and multimodal content parts are not supported (an error).
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "core/tokenizer.h"

namespace tl {

struct ChatMessage {
  std::string role;       // system | developer | user | assistant | model
  std::string content;
  std::string reasoning;  // thinking text ("reasoning" / "reasoning_content" in JSON)
};

struct ChatOptions {
  bool add_generation_prompt = false;  // end with "<|turn>model\n"
  bool enable_thinking = false;        // "<|think|>\n" at the top of a (possibly empty) system turn
  // The 31B / 26B-A4B templates: without enable_thinking, the generation prompt also holds an
  // empty thought block, "<|turn>model\n<|channel>thought\n<channel|>". (E2B/E4B: no block.)
  bool empty_thought_in_prompt = false;
};

// The rendering cut where training starts and stops. A model turn's trainable span is
// everything after "<|turn>model\n" up to and including its "<turn|>" (reasoning, answer, end
// of turn: the model must learn to stop); the "\n" after "<turn|>" is not trained, as with
// TRL's assistant masks ({% generation %}) and axolotl's train_on_eos: turn.
struct ChatSegment {
  std::string text;
  bool trainable = false;
};

std::vector<ChatSegment> render_chat_segments(const std::vector<ChatMessage>& messages,
                                              const ChatOptions& options = {});
std::string render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options = {});

constexpr int32_t kIgnoreLabel = -100;

struct EncodedChat {
  std::vector<int32_t> ids;     // the whole rendering, encoded at once (starts with <bos>)
  std::vector<int32_t> labels;  // ids[i] on tokens of trainable spans, kIgnoreLabel elsewhere;
                                // not shifted (HF convention: the loss shifts)
};

// Tokens overlapping a trainable span are trained, as transformers'
// return_assistant_tokens_mask marks them.
EncodedChat encode_chat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                        const ChatOptions& options = {});

// Messages from an OpenAI-style JSON array ([{"role": "...", "content": "..."}, ...]); `label`
// (a file and line, say) names the source in errors. Content must be a string or null.
std::vector<ChatMessage> chat_from_json(const nlohmann::json& messages, const std::string& label);

}  // namespace tl
