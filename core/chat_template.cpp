// Mirrors models/tiny/chat_template.jinja statement by statement; keep the two in step.
#include "core/chat_template.h"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/tensor.h"

namespace tl {

namespace {

// Code point at s[i] and its byte length; invalid bytes decode as themselves (never spaces).
std::pair<uint32_t, size_t> code_point(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
             : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (n <= 1 || i + n > s.size()) return {n == 1 ? c : 0xFFFFFFFF, 1};
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    auto d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xC0) != 0x80) return {0xFFFFFFFF, 1};
    cp = cp << 6 | (d & 0x3F);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n]) return {0xFFFFFFFF, 1};  // overlong: not a character
  return {cp, n};
}

// Python's str.isspace(), which Jinja's `trim` uses.
bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = 0;
  for (size_t i = 0; i < s.size();) {
    auto [cp, n] = code_point(s, i);
    i += n;
    if (py_space(cp)) {
      if (b == i - n) b = i;  // still in the leading run
    } else {
      e = i;
    }
  }
  return e > b ? std::string(s.substr(b, e - b)) : std::string();
}

// The template's strip_thinking: keep what precedes "<|channel>" in each piece between
// "<channel|>"s, then trim.
std::string strip_thinking(std::string_view text) {
  std::string out;
  for (size_t pos = 0;;) {
    size_t close = text.find("<channel|>", pos);
    std::string_view chunk = text.substr(pos, close == text.npos ? text.npos : close - pos);
    out += chunk.substr(0, chunk.find("<|channel>"));
    if (close == std::string_view::npos) break;
    pos = close + std::string_view("<channel|>").size();
  }
  return trim(out);
}

void check_role(const std::string& role, const std::string& where) {
  static const char* kRoles[] = {"system", "developer", "user", "assistant", "model"};
  if (std::find(std::begin(kRoles), std::end(kRoles), role) == std::end(kRoles))
    throw Error(fmt::format("{}: role '{}' is not supported (system, developer, user, assistant, "
                            "model; tools are not)", where, role));
}

}  // namespace

std::vector<ChatSegment> render_chat_segments(const std::vector<ChatMessage>& messages,
                                              const ChatOptions& options) {
  std::vector<ChatSegment> out;
  auto emit = [&](std::string_view text, bool trainable) {
    if (text.empty()) return;
    if (!out.empty() && out.back().trainable == trainable) out.back().text += text;
    else out.push_back({std::string(text), trainable});
  };
  for (size_t i = 0; i < messages.size(); ++i)
    check_role(messages[i].role, fmt::format("chat message {}", i));

  emit("<bos>", false);
  size_t first = 0;  // messages[first..] are the turns after the system turn
  bool system =
      !messages.empty() && (messages[0].role == "system" || messages[0].role == "developer");
  if (options.enable_thinking || system) {
    emit("<|turn>system\n", false);
    if (options.enable_thinking) emit("<|think|>\n", false);
    if (system) emit(trim(messages[0].content), false), first = 1;
    emit("<turn|>\n", false);
  }
  size_t last_user = 0;  // one past the index of the last user message (0: none)
  for (size_t i = first; i < messages.size(); ++i)
    if (messages[i].role == "user") last_user = i + 1;

  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    bool model = m.role == "assistant" || m.role == "model";
    // An assistant message right after an assistant message continues the same model turn.
    bool continued = model && i > first && messages[i - 1].role == "assistant";
    bool continues = model && i + 1 < messages.size() && messages[i + 1].role == "assistant";
    std::string role = m.role == "assistant" ? "model" : m.role;
    if (!continued) emit("<|turn>" + role + "\n", false);
    if (!m.reasoning.empty() && i >= last_user)
      emit("<|channel>thought\n" + m.reasoning + "\n<channel|>", model);
    emit(model ? strip_thinking(m.content) : trim(m.content), model);
    if (!continues) emit("<turn|>", model), emit("\n", false);
  }
  if (options.add_generation_prompt) emit("<|turn>model\n", false);
  if (options.add_generation_prompt && options.empty_thought_in_prompt && !options.enable_thinking)
    emit("<|channel>thought\n<channel|>", false);
  return out;
}

std::string render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options) {
  std::string text;
  for (const ChatSegment& s : render_chat_segments(messages, options)) text += s.text;
  return text;
}

EncodedChat encode_chat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                        const ChatOptions& options) {
  std::string text;
  std::vector<std::pair<size_t, size_t>> trained;  // byte ranges of trainable segments, in order
  for (const ChatSegment& s : render_chat_segments(messages, options)) {
    if (s.trainable) trained.emplace_back(text.size(), text.size() + s.text.size());
    text += s.text;
  }
  // Encode the whole text at once (as apply_chat_template does): encoding segment by segment
  // could merge differently at the cuts.
  std::vector<Tokenizer::Span> spans;
  EncodedChat out;
  out.ids = tokenizer.encode(text, &spans);
  out.labels.assign(out.ids.size(), kIgnoreLabel);
  size_t r = 0;
  for (size_t i = 0; i < out.ids.size(); ++i) {
    while (r < trained.size() && trained[r].second <= spans[i].begin) ++r;
    if (r < trained.size() && trained[r].first < spans[i].end) out.labels[i] = out.ids[i];
  }
  return out;
}

std::vector<ChatMessage> chat_from_json(const nlohmann::json& messages, const std::string& label) {
  if (!messages.is_array()) throw Error(label + ": messages must be a JSON array");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const nlohmann::json& m = messages[i];
    std::string where = fmt::format("{}: message {}", label, i);
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw Error(where + ": needs a string \"role\"");
    ChatMessage msg{m["role"].get<std::string>(), "", ""};
    check_role(msg.role, where);
    if (m.contains("tool_calls") && !m["tool_calls"].is_null() && !m["tool_calls"].empty())
      throw Error(where + ": tool_calls are not supported");
    auto text = [&](const char* key) {
      auto it = m.find(key);
      if (it == m.end() || it->is_null()) return std::string();
      if (!it->is_string())
        throw Error(fmt::format("{}: \"{}\" must be a string (content parts are not supported)",
                                where, key));
      return it->get<std::string>();
    };
    msg.content = text("content");
    msg.reasoning = text("reasoning");
    if (msg.reasoning.empty()) msg.reasoning = text("reasoning_content");  // the template's `or`
    // A turn without text would render (and train) as an empty message: a dropped field, not
    // an empty answer ("content": "" says that). A null content beside reasoning is a turn of
    // thinking only, as the template renders it.
    if (!m.contains("content") || (m["content"].is_null() && msg.reasoning.empty()))
      throw Error(where + ": has no \"content\" (an empty turn is \"content\": \"\")");
    out.push_back(std::move(msg));
  }
  return out;
}

}  // namespace tl
