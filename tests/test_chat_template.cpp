// The C++ Gemma 4 chat rendering against transformers' apply_chat_template with
// models/tiny/chat_template.jinja (tests/golden/tokenizer/chats.json).
#include "core/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/tensor.h"

namespace tl {
namespace {

using nlohmann::json;

std::string source(const std::string& rel) { return std::string(TL_SOURCE_DIR) + "/" + rel; }
json chats() {
  std::ifstream f(source("tests/golden/tokenizer/chats.json"), std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}
const Tokenizer& tiny() {
  static const Tokenizer t = Tokenizer::load(source("models/tiny/tokenizer.json"));
  return t;
}
ChatOptions options(const json& c) {
  return {.add_generation_prompt = c.value("add_generation_prompt", false),
          .enable_thinking = c.value("enable_thinking", false)};
}

TEST(ChatTemplate, RendersLikeApplyChatTemplate) {
  json cases = chats();
  ASSERT_GE(cases.size(), 8u);
  for (const json& c : cases) {
    std::vector<ChatMessage> msgs = chat_from_json(c["messages"], c["name"]);
    EXPECT_EQ(render_chat(msgs, options(c)), c["rendered"].get<std::string>()) << c["name"];
  }
}

TEST(ChatTemplate, EncodesWithTheAssistantMasksOfTransformers) {
  for (const json& c : chats()) {
    std::string name = c["name"];
    EncodedChat e = encode_chat(tiny(), chat_from_json(c["messages"], name), options(c));
    EXPECT_EQ(e.ids, c["ids"].get<std::vector<int32_t>>()) << name;
    EXPECT_EQ(e.ids, tiny().encode(c["rendered"].get<std::string>())) << name;
    std::vector<int> mask = c["assistant_masks"];
    ASSERT_EQ(e.labels.size(), mask.size()) << name;
    for (size_t i = 0; i < mask.size(); ++i)
      EXPECT_EQ(e.labels[i], mask[i] ? e.ids[i] : kIgnoreLabel) << name << " token " << i;
    EXPECT_EQ(std::count(e.ids.begin(), e.ids.end(), 2), 1) << name;  // one <bos>, first
    EXPECT_EQ(e.ids.front(), 2) << name;
  }
}

// The trained tokens are exactly each model turn's text and its <turn|>.
TEST(ChatTemplate, LossMaskCoversExactlyTheModelTurns) {
  std::vector<ChatMessage> msgs = {{"system", "Be terse.", ""},
                                   {"user", "Hi", ""},
                                   {"assistant", "<|channel>thought\nold<channel|>Hello.", ""},
                                   {"user", "Again", ""},
                                   {"assistant", "Bye.", "brief"}};
  auto segs = render_chat_segments(msgs);
  std::vector<std::string> trained;
  for (auto& s : segs)
    if (s.trainable) trained.push_back(s.text);
  EXPECT_EQ(trained, (std::vector<std::string>{"Hello.<turn|>",
                                                "<|channel>thought\nbrief\n<channel|>Bye.<turn|>"}));
  EncodedChat e = encode_chat(tiny(), msgs);
  std::vector<int32_t> kept;
  for (size_t i = 0; i < e.ids.size(); ++i)
    if (e.labels[i] != kIgnoreLabel) kept.push_back(e.ids[i]);
  EXPECT_EQ(tiny().decode(kept), "Hello.<turn|><|channel>thought\nbrief\n<channel|>Bye.<turn|>");
  EXPECT_EQ(e.labels.back(), kIgnoreLabel);  // the "\n" after <turn|>
  EXPECT_EQ(e.labels[e.labels.size() - 2], tiny().token_id("<turn|>"));
  // A generation prompt is never trained. (With a later user turn, "Bye." loses its reasoning.)
  msgs.push_back({"user", "More?", ""});
  EncodedChat p = encode_chat(tiny(), msgs, {.add_generation_prompt = true});
  EXPECT_TRUE(render_chat(msgs, {.add_generation_prompt = true}).ends_with("More?<turn|>\n<|turn>model\n"));
  auto trained_text = [](const EncodedChat& c) {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < c.ids.size(); ++i)
      if (c.labels[i] != kIgnoreLabel) ids.push_back(c.ids[i]);
    return tiny().decode(ids);
  };
  EXPECT_EQ(trained_text(p), "Hello.<turn|>Bye.<turn|>");
}

// As Google's 31B template renders it (checked with make_tokenizer_golden.py --check-against).
TEST(ChatTemplate, LargeModelPromptHasAnEmptyThoughtBlock) {
  std::vector<ChatMessage> msgs = {{"user", "Tell me a joke.", ""}};
  EXPECT_EQ(render_chat(msgs, {.add_generation_prompt = true, .empty_thought_in_prompt = true}),
            "<bos><|turn>user\nTell me a joke.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>");
  EXPECT_EQ(render_chat(msgs, {.add_generation_prompt = true, .enable_thinking = true,
                               .empty_thought_in_prompt = true}),
            "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nTell me a joke.<turn|>\n<|turn>model\n");
}

TEST(ChatTemplate, TrimsLikePython) {
  // U+2003 and U+205F are Python whitespace; U+200B (zero-width space) is not.
  std::vector<ChatMessage> msgs = {{"user", "\xE2\x80\x83 x \xE2\x81\x9F", ""},
                                   {"assistant", "\xE2\x80\x8B y\x1c", ""}};
  EXPECT_EQ(render_chat(msgs), "<bos><|turn>user\nx<turn|>\n<|turn>model\n\xE2\x80\x8B y<turn|>\n");
  EXPECT_EQ(render_chat({{"user", " \t\n ", ""}}), "<bos><|turn>user\n<turn|>\n");
}

TEST(ChatTemplate, RefusesWhatItDoesNotRender) {
  auto expect_error = [](const json& msgs, const std::string& what) {
    try {
      chat_from_json(msgs, "data.jsonl:7");
      ADD_FAILURE() << msgs.dump();
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find("data.jsonl:7"), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
  };
  expect_error(json::object(), "array");
  expect_error(json::parse(R"([{"content": "x"}])"), "role");
  expect_error(json::parse(R"([{"role": "tool", "content": "x"}])"), "role 'tool'");
  expect_error(json::parse(R"([{"role": "user", "content": [{"type": "text", "text": "x"}]}])"), "content");
  expect_error(json::parse(R"([{"role": "assistant", "tool_calls": [{"function": {}}]}])"), "tool_calls");
  // Issue 27: a message without text is refused, not rendered as an empty turn.
  expect_error(json::parse(R"([{"role": "user", "content": "hi"}, {"role": "assistant"}])"),
               "message 1: has no \"content\"");
  expect_error(json::parse(R"([{"role": "user", "content": null}])"), "message 0: has no \"content\"");
  EXPECT_THROW(render_chat({{"function", "x", ""}}), Error);
  auto msgs = chat_from_json(json::parse(R"([{"role": "assistant", "content": null,
                                             "reasoning_content": "r"}])"), "x");
  EXPECT_EQ(msgs[0].content, "");
  EXPECT_EQ(msgs[0].reasoning, "r");
}

}  // namespace
}  // namespace tl
