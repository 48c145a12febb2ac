#include "train/eval/evaluate.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>

#include "core/safetensors.h"
#include "core/weights.h"
#include "train/eval/generate.h"
#include "train/model/lora.h"
#include "train/model/peft_adapter.h"

namespace tl {

namespace fs = std::filesystem;

EvalModel load_eval_model(const fs::path& model_dir, const fs::path& adapter_dir, bool load_in_4bit, Ops& ops) {
  if (!fs::is_directory(model_dir)) throw Error(fmt::format("{}: model directory not found", model_dir.string()));
  EvalModel m;
  m.dir = model_dir.string();
  const Gemma4Config config = Gemma4Config::load(model_dir);
  const Checkpoint ckpt = Checkpoint::open(model_dir);
  m.model = std::make_unique<Gemma4Model>(config, ops);
  // Streaming; a -bnb-4bit checkpoint's projections stay in its NF4 whatever load_in_4bit says
  // (as transformers loads it: there is no full-precision copy to compute from).
  m.model->load(ckpt, load_in_4bit ? Gemma4LoadOptions::nf4(true) : Gemma4LoadOptions{});
  const std::string prefix = decoder_prefix(ckpt);
  const fs::path tok = model_dir / "tokenizer.json";
  if (!fs::exists(tok)) throw Error(fmt::format("{}: no tokenizer.json beside the weights", model_dir.string()));
  m.tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(tok.string()));
  m.stop_tokens = stop_tokens_for(model_dir, *m.tokenizer);
  if (adapter_dir.empty()) return m;
  if (!fs::is_directory(adapter_dir))
    throw Error(fmt::format("{}: adapter directory not found", adapter_dir.string()));
  const PeftAdapter adapter = read_peft_adapter(adapter_dir);
  const std::string file = (adapter_dir / "adapter_model.safetensors").string();
  for (const AdapterTensors& a : adapter.adapters) {
    Tensor* w = weight_slot(m.model->mutable_weights(), a.weight);
    if (!w)
      throw Error(fmt::format("{}: adapts '{}', which the base {} does not have (adapter made for another model?)", file,
                              a.weight, model_dir.string()));
    const Shape ws = m.model->nf4(a.weight) ? m.model->nf4(a.weight)->shape : w->shape();
    if (a.A.dim(1) != ws[1] || a.B.dim(0) != ws[0] || a.A.dim(0) != a.B.dim(1))
      throw Error(fmt::format("{}: '{}' has lora_A {} and lora_B {}, which do not fit the base weight {} (adapter "
                              "made for another model?)",
                              file, a.weight, shape_str(a.A.shape()), shape_str(a.B.shape()), shape_str(ws)));
    const std::string module = prefix + a.weight.substr(0, a.weight.size() - 7);
    m.model->attach_lora(a.weight, a.A, a.B, adapter.spec.scaling_for(module));
  }
  return m;
}

HeldOut held_out(Gemma4Model& model, Gemma4Model* parent, const std::vector<Row>& rows, int64_t micro_batch,
                 int64_t first, int64_t stride) {
  HeldOut r;
  std::vector<int64_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  model.set_training(false);
  if (parent) parent->set_training(false);
  if (stride <= 0) stride = micro_batch;
  for (int64_t b = first; b < int64_t(order.size()); b += stride) {
    const int64_t k = std::min<int64_t>(micro_batch, int64_t(order.size()) - b);
    MicroBatch mb = make_micro_batch(rows, order, b, k);
    const Tensor hidden = model.forward_hidden(mb.batch);
    const auto l = model.loss(hidden, mb.labels);
    r.loss.sum += l.sum;
    r.loss.count += l.count;
    if (!parent) continue;
    const Ops::DistillSums d = model.distill_sums(hidden, *parent, parent->forward_hidden(mb.batch), mb.labels);
    r.parent.kl += d.kl;
    r.parent.count += d.count;
    r.parent.agree += d.agree;
  }
  return r;
}

double continuation_loglik(Gemma4Model& model, Ops& ops, std::span<const int32_t> context,
                           std::span<const int32_t> option) {
  if (context.empty()) throw Error("continuation_loglik: empty context");
  const int64_t n = int64_t(context.size()), m = int64_t(option.size());
  Tensor ids = Tensor::zeros({1, n + m}, DType::I32);
  std::copy(context.begin(), context.end(), ids.data<int32_t>());
  std::copy(option.begin(), option.end(), ids.data<int32_t>() + n);
  model.set_training(false);
  const Tensor hidden = model.forward_hidden(Batch{ids, {}, {}});
  // Row n−1+j predicts option[j]: log softmax = x_t − max − log Σ exp(x − max).
  const Tensor logits = ops.download(model.logits(hidden.slice_rows(n - 1, n + m - 1))).to(DType::F64);
  const int64_t V = logits.dim(1);
  double total = 0;
  for (int64_t j = 0; j < m; ++j) {
    const double* x = logits.data<double>() + j * V;
    const double top = *std::max_element(x, x + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(x[v] - top);
    total += x[option[size_t(j)]] - top - std::log(sum);
  }
  return total;
}

std::vector<McItem> load_mc_jsonl(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("{}: cannot open the multiple-choice file", path.string()));
  std::vector<McItem> items;
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string at = fmt::format("{}:{}", path.string(), no);
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) throw Error(at + ": not a JSON object");
    McItem item;
    auto text = [&](const char* key) {
      const auto it = j.find(key);
      return it != j.end() && it->is_string() ? std::optional(it->get<std::string>()) : std::nullopt;
    };
    if (auto q = text("question")) {
      item.question = *q;
      const auto c = j.find("choices") != j.end() ? j.find("choices") : j.find("options");
      if (c == j.end() || !c->is_array()) throw Error(at + ": no 'choices' list");
      for (const auto& o : *c) {
        if (!o.is_string()) throw Error(at + ": every choice must be a string");
        item.options.push_back(o.get<std::string>());
      }
      const auto a = j.find("answer");
      if (a == j.end() || a->is_null()) throw Error(at + ": no correct answer ('answer' is missing)");
      if (a->is_number_integer()) item.answer = a->get<int64_t>();
      else if (a->is_string() && a->get<std::string>().size() == 1) item.answer = a->get<std::string>()[0] - 'A';
      else throw Error(at + ": 'answer' must be an option index or a letter");
      if (item.answer < 0 || item.answer >= int64_t(item.options.size()))
        throw Error(fmt::format("{}: no correct answer: 'answer' names option {} of {}", at, item.answer,
                                item.options.size()));
    } else if (auto q2 = text("Question")) {
      item.question = *q2;
      auto correct = text("Correct Answer");
      if (!correct || correct->empty()) throw Error(at + ": no correct answer ('Correct Answer' is missing)");
      item.options.push_back(*correct);
      item.answer = 0;
      for (int k = 1; k <= 9; ++k)
        if (auto wrong = text(fmt::format("Incorrect Answer {}", k).c_str())) item.options.push_back(*wrong);
    } else {
      throw Error(at + ": no 'question' (or GPQA's 'Question')");
    }
    if (item.options.size() < 2) throw Error(at + ": fewer than two options");
    items.push_back(std::move(item));
  }
  if (items.empty()) throw Error(fmt::format("{}: no questions", path.string()));
  return items;
}

namespace {
std::vector<int32_t> mc_context(const Tokenizer& tok, const McItem& item) {
  std::vector<int32_t> context{tok.token_id("<bos>")};
  for (int32_t t : tok.encode("Question: " + item.question + "\nAnswer:")) context.push_back(t);
  return context;
}
std::vector<int32_t> mc_option(const Tokenizer& tok, const std::string& option) { return tok.encode(" " + option); }
}  // namespace

std::pair<int64_t, size_t> mc_longest_sequence(const Tokenizer& tok, const std::vector<McItem>& items) {
  std::pair<int64_t, size_t> longest{0, 0};
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t c = int64_t(mc_context(tok, items[i]).size());
    for (const std::string& o : items[i].options)
      longest = std::max(longest, {c + int64_t(mc_option(tok, o).size()), i},
                         [](const auto& a, const auto& b) { return a.first < b.first; });
  }
  return longest;
}

McResult score_mc(Gemma4Model& model, Ops& ops, const Tokenizer& tok, const std::vector<McItem>& items) {
  McResult r;
  for (const McItem& item : items) {
    const std::vector<int32_t> context = mc_context(tok, item);
    int64_t best = 0, best_norm = 0;
    double top = -INFINITY, top_norm = -INFINITY;
    for (size_t o = 0; o < item.options.size(); ++o) {
      const std::vector<int32_t> option = mc_option(tok, item.options[o]);
      const double ll = continuation_loglik(model, ops, context, option);
      const double norm = ll / double(std::max<size_t>(1, option.size()));
      if (ll > top) top = ll, best = int64_t(o);
      if (norm > top_norm) top_norm = norm, best_norm = int64_t(o);
    }
    ++r.items;
    r.correct += best == item.answer;
    r.correct_norm += best_norm == item.answer;
  }
  return r;
}

std::vector<Generation> greedy_generations(Gemma4Model& model, Ops& ops, const std::vector<std::vector<int32_t>>& prompts,
                                           int64_t max_new_tokens, std::span<const int32_t> stop_tokens) {
  model.set_training(false);
  std::vector<Generation> out;
  for (const auto& p : prompts) {
    const GreedyResult g = greedy_generate(model, ops, p, max_new_tokens, stop_tokens);
    out.push_back({p, g.tokens, g.stopped});
  }
  return out;
}

double cross_perplexity(Gemma4Model& reference, const std::vector<Generation>& generations) {
  Gemma4Model::Loss total;
  reference.set_training(false);
  for (const Generation& g : generations) {
    if (g.tokens.empty() || g.prompt.empty()) continue;
    const int64_t n = int64_t(g.prompt.size()), m = int64_t(g.tokens.size());
    Tensor ids = Tensor::zeros({1, n + m}, DType::I32), labels = Tensor::zeros({1, n + m}, DType::I32);
    for (int64_t t = 0; t < n + m; ++t) {
      ids.data<int32_t>()[t] = t < n ? g.prompt[size_t(t)] : g.tokens[size_t(t - n)];
      labels.data<int32_t>()[t] = t < n ? -100 : ids.data<int32_t>()[t];
    }
    const auto l = reference.loss(reference.forward_hidden(Batch{ids, {}, {}}), labels);
    total.sum += l.sum;
    total.count += l.count;
  }
  return total.count ? std::exp(total.mean()) : NAN;
}

void score_generations(EvalMeasures& m, const std::vector<Generation>& generations) {
  GenerationScores s;
  for (const Generation& g : generations) s.add(g.tokens, g.stopped);
  m.generation = s.mean();
}

nlohmann::json EvalMeasures::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  auto put = [&](const char* k, double v) {
    if (std::isfinite(v)) j[k] = v;
  };
  put("eval_loss", eval_loss);
  put("perplexity", perplexity);
  put("cross_perplexity", cross_perplexity);
  put("mc_accuracy", mc_accuracy);
  put("mc_accuracy_norm", mc_accuracy_norm);
  put("eval_kl_parent", kl_parent);
  put("eval_top1_parent", top1_parent);
  if (generation.count > 0) {
    const GenerationScores& g = generation;
    j["generations"] = g.count;
    j["gen_stopped"] = g.stopped;
    put("distinct_2", g.distinct2);
    put("distinct_3", g.distinct3);
    put("distinct_4", g.distinct4);
    put("gen_rep4", g.rep4);
    put("repeated_suffix", g.repeated_suffix);
    put("loop_fraction", g.loop_fraction);
  }
  return j;
}

EvalMeasures EvalMeasures::from_json(const nlohmann::json& j) {
  EvalMeasures m;
  auto get = [&](const char* k) { return j.contains(k) && j[k].is_number() ? j[k].get<double>() : NAN; };
  m.eval_loss = get("eval_loss");
  m.perplexity = get("perplexity");
  m.cross_perplexity = get("cross_perplexity");
  m.mc_accuracy = get("mc_accuracy");
  m.mc_accuracy_norm = get("mc_accuracy_norm");
  m.kl_parent = get("eval_kl_parent");
  m.top1_parent = get("eval_top1_parent");
  m.generation.count = j.value("generations", int64_t(0));
  m.generation.stopped = j.value("gen_stopped", int64_t(0));
  m.generation.distinct2 = get("distinct_2");
  m.generation.distinct3 = get("distinct_3");
  m.generation.distinct4 = get("distinct_4");
  m.generation.rep4 = get("gen_rep4");
  m.generation.repeated_suffix = get("repeated_suffix");
  m.generation.loop_fraction = get("loop_fraction");
  return m;
}

std::vector<int32_t> generation_prompt(const Example& e, int64_t max_len) {
  const int64_t n = int64_t(e.ids.size());
  if (n < 2 || max_len < 1) return {};
  int64_t end = 0;
  while (end < n && e.labels[size_t(end)] == -100) ++end;
  if (end == 0) end = std::min<int64_t>(64, n / 2);  // nothing masked: continue the text's first half
  if (end == n) return {};                          // nothing trained: no reference continuation
  const int64_t begin = std::max<int64_t>(0, end - max_len);
  return {e.ids.begin() + begin, e.ids.begin() + end};
}

}  // namespace tl
