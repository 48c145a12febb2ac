#include "train/data/data.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/chat_template.h"
#include "train/model/lora.h"

namespace tl {

using nlohmann::json;

namespace {

std::string text_field(const json& j, const std::string& key, const std::string& where, bool required = true) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw Error(fmt::format("{}: missing field '{}'", where, key));
    return "";
  }
  if (!it->is_string()) throw Error(fmt::format("{}: field '{}' must be a string", where, key));
  return it->get<std::string>();
}

Example encode_completion(const Tokenizer& tok, const std::string& text) {
  // Raw text: one <bos> in front (Gemma 4's tokenizer adds none), <eos> at the end.
  Example e;
  e.ids.push_back(tok.token_id("<bos>"));
  auto body = tok.encode(text);
  e.ids.insert(e.ids.end(), body.begin(), body.end());
  e.ids.push_back(tok.token_id("<eos>"));
  e.labels = e.ids;
  return e;
}

std::vector<ChatMessage> messages_of(const json& j, const DatasetConfig& d, const std::string& where) {
  auto it = j.find(d.field_messages);
  if (it == j.end() || !it->is_array())
    throw Error(fmt::format("{}: field '{}' must be a list of messages", where, d.field_messages));
  json normalised = json::array();
  for (const auto& m : *it) {
    if (!m.is_object()) throw Error(fmt::format("{}: each message must be an object", where));
    std::string role = text_field(m, d.message_field_role, where);
    // ShareGPT speaker names.
    if (role == "human") role = "user";
    else if (role == "gpt") role = "assistant";
    if (!m.contains(d.message_field_content) || m[d.message_field_content].is_null())
      throw Error(fmt::format("{}: message {} has no '{}' (an empty turn is \"{}\": \"\")", where, normalised.size(),
                              d.message_field_content, d.message_field_content));
    normalised.push_back({{"role", role}, {"content", m[d.message_field_content]}});
  }
  return chat_from_json(normalised, where);
}

Example encode_line(const json& j, const DatasetConfig& d, const Tokenizer& tok, bool train_on_inputs,
                    const std::string& where) {
  if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object", where));
  Example e;
  if (d.type == "completion" || d.type == "text") {
    e = encode_completion(tok, text_field(j, d.field, where));
  } else {
    std::vector<ChatMessage> msgs;
    if (d.type == "alpaca") {
      std::string prompt = text_field(j, d.field_instruction, where);
      std::string input = text_field(j, d.field_input, where, false);
      if (!input.empty()) prompt += "\n\n" + input;
      msgs = {{"user", prompt, ""}, {"assistant", text_field(j, d.field_output, where), ""}};
    } else {
      msgs = messages_of(j, d, where);
    }
    EncodedChat c = encode_chat(tok, msgs);
    e.ids = std::move(c.ids);
    e.labels = std::move(c.labels);
    if (train_on_inputs) e.labels = e.ids;
  }
  return e;
}

}  // namespace

std::vector<Example> load_examples(const DataConfig& cfg, const Tokenizer& tok, DataStats& stats) {
  std::vector<Example> out;
  for (const DatasetConfig& d : cfg.datasets) {
    for (const auto& role : d.roles_to_train)
      if (role != "assistant" && role != "model")
        throw Error(fmt::format("{}: roles_to_train '{}' is not supported (only the model's turns are trained)",
                                d.path, role));
    if (std::filesystem::is_directory(d.path))
      throw Error(fmt::format("{}: is a directory; a dataset's path names a .jsonl file", d.path));
    std::ifstream in(d.path);
    if (!in) throw Error(fmt::format("{}: cannot open dataset", d.path));
    std::string line;
    int64_t lineno = 0, from_this = 0, dropped_here = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines
      const std::string where = fmt::format("{}:{}", d.path, lineno);
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        throw Error(fmt::format("{}: not valid JSON ({})", where, e.what()));
      }
      Example e = encode_line(j, d, tok, cfg.train_on_inputs, where);
      ++stats.examples;
      if (int64_t(e.ids.size()) > cfg.sequence_len) {
        if (cfg.overlong == "drop") {
          ++stats.dropped;
          ++dropped_here;
          continue;
        }
        ++stats.truncated;
        e.ids.resize(size_t(cfg.sequence_len));
        e.labels.resize(size_t(cfg.sequence_len));
      }
      stats.tokens += int64_t(e.ids.size());
      for (size_t i = 1; i < e.labels.size(); ++i) stats.trained_tokens += e.labels[i] != -100;
      out.push_back(std::move(e));
      ++from_this;
    }
    if (from_this == 0 && dropped_here > 0)
      throw Error(fmt::format("{}: every one of its {} examples is longer than sequence_len {} and was dropped "
                              "(overlong: drop); raise sequence_len or set overlong: truncate",
                              d.path, dropped_here, cfg.sequence_len));
    if (from_this == 0) throw Error(fmt::format("{}: dataset is empty (no usable lines)", d.path));
  }
  return out;
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  uint64_t state = splitmix64(seed ^ splitmix64(uint64_t(epoch) + 0x5eed));
  for (int64_t i = n - 1; i > 0; --i) {
    state = splitmix64(state);
    int64_t j = int64_t(state % uint64_t(i + 1));
    std::swap(order[size_t(i)], order[size_t(j)]);
  }
  return order;
}

void split_validation(std::vector<Example>& train, std::vector<Example>& val, double fraction, uint64_t seed) {
  if (fraction <= 0) return;
  const int64_t n = int64_t(train.size());
  const int64_t k = std::min<int64_t>(n - 1, int64_t(std::ceil(fraction * double(n))));
  if (k <= 0) return;
  auto order = epoch_order(n, seed, -1);
  std::vector<bool> is_val(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < k; ++i) is_val[size_t(order[size_t(i)])] = true;
  std::vector<Example> rest;
  for (int64_t i = 0; i < n; ++i) (is_val[size_t(i)] ? val : rest).push_back(std::move(train[size_t(i)]));
  train = std::move(rest);
}

std::vector<Row> make_rows(const std::vector<Example>& examples, int64_t sequence_len, bool packing) {
  std::vector<Row> rows;
  Row cur;
  int32_t doc = 0;
  auto flush = [&] {
    if (!cur.ids.empty()) rows.push_back(std::move(cur));
    cur = {};
    doc = 0;
  };
  for (const Example& e : examples) {
    if (!packing || int64_t(cur.ids.size() + e.ids.size()) > sequence_len) flush();
    for (size_t i = 0; i < e.ids.size(); ++i) {
      cur.ids.push_back(e.ids[i]);
      // No target crosses into a new document: the first label of each is ignored.
      cur.labels.push_back(i == 0 ? -100 : e.labels[i]);
      cur.positions.push_back(int32_t(i));
      cur.doc_ids.push_back(doc);
    }
    ++doc;
  }
  flush();
  return rows;
}

MicroBatch make_micro_batch(const std::vector<Row>& rows, const std::vector<int64_t>& order, int64_t begin,
                            int64_t count) {
  size_t S = 0;
  for (int64_t i = 0; i < count; ++i) S = std::max(S, rows[size_t(order[size_t(begin + i)])].ids.size());
  Tensor ids = Tensor::zeros({count, int64_t(S)}, DType::I32), labels = Tensor::zeros({count, int64_t(S)}, DType::I32),
         pos = Tensor::zeros({count, int64_t(S)}, DType::I32), doc = Tensor::zeros({count, int64_t(S)}, DType::I32);
  for (int64_t b = 0; b < count; ++b) {
    const Row& r = rows[size_t(order[size_t(begin + b)])];
    for (size_t t = 0; t < S; ++t) {
      const bool real = t < r.ids.size();
      const size_t k = size_t(b) * S + t;
      ids.data<int32_t>()[k] = real ? r.ids[t] : 0;
      labels.data<int32_t>()[k] = real ? r.labels[t] : -100;
      pos.data<int32_t>()[k] = real ? r.positions[t] : int32_t(t);
      doc.data<int32_t>()[k] = real ? r.doc_ids[t] : -1;  // padding: a document of its own
    }
  }
  return {{ids, pos, doc}, labels};
}

}  // namespace tl
