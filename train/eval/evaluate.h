// The measures torchless-eval reports and the trainer logs at eval_steps: held-out loss and
// perplexity, greedy generations scored for repetition (train/eval/text_measures.h), the
// cross-perplexity of those generations under a reference model, and multiple-choice
// accuracy from option log-likelihoods.
#pragma once
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "train/data/data.h"
#include "train/model/gemma4_model.h"
#include "train/eval/text_measures.h"

namespace tl {

// A checkpoint ready to evaluate: its decoder (optionally with its projections held in NF4,
// as a QLoRA run trains against, and a PEFT adapter attached), tokenizer and stop tokens.
struct EvalModel {
  std::unique_ptr<Gemma4Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<int32_t> stop_tokens;
  std::string dir;
};
// Errors: a missing adapter directory, or an adapter whose modules or shapes do not fit the
// base ("adapter made for another model?"), each one line naming the file.
EvalModel load_eval_model(const std::filesystem::path& model_dir, const std::filesystem::path& adapter_dir,
                          bool load_in_4bit, Ops& ops);


// The held-out cross-entropy of `model` and, with a parent, on the same targets Σ KL(p_parent ‖
// p_model) at temperature 1 over the whole vocabulary and the targets where both argmaxes
// agree (issue 24). Micro-batches of `micro_batch` rows from row `first`, every `stride` rows
// (a data-parallel rank's share; the caller sums over ranks).
struct HeldOut {
  Gemma4Model::Loss loss;
  Ops::DistillSums parent;  // count 0 without a parent
};
HeldOut held_out(Gemma4Model& model, Gemma4Model* parent, const std::vector<Row>& rows, int64_t micro_batch,
                 int64_t first = 0, int64_t stride = 0);

// Σ_j log p(option[j] | context, option[<j]) (natural log), from one forward of
// context + option. `context` must not be empty.
double continuation_loglik(Gemma4Model& model, Ops& ops, std::span<const int32_t> context,
                           std::span<const int32_t> option);

// One GPQA-style question. A jsonl line holds either {"question", "choices": [...], "answer":
// index or letter "A"…} or GPQA's {"Question", "Correct Answer", "Incorrect Answer 1"…}.
struct McItem {
  std::string question;
  std::vector<std::string> options;
  int64_t answer = -1;
};
// Errors name the file and line: not JSON, no question, fewer than two options, no correct
// answer (missing, or not one of the options).
std::vector<McItem> load_mc_jsonl(const std::filesystem::path& path);

// Each option is scored as the continuation " OPTION" of "<bos>Question: Q\nAnswer:"; the
// prediction is the option with the highest log-likelihood (acc), or per token (acc_norm).
struct McResult {
  int64_t items = 0, correct = 0, correct_norm = 0;
  double accuracy() const { return items ? double(correct) / double(items) : 0.0; }
  double accuracy_norm() const { return items ? double(correct_norm) / double(items) : 0.0; }
};
McResult score_mc(Gemma4Model& model, Ops& ops, const Tokenizer& tok, const std::vector<McItem>& items);
// The tokens of the longest sequence score_mc runs for `items` (context and option), and which
// item (0-based) it belongs to: what a tool checks against the context before scoring.
std::pair<int64_t, size_t> mc_longest_sequence(const Tokenizer& tok, const std::vector<McItem>& items);

// One generation: the prompt, the greedy continuation and whether it ended on a stop token.
struct Generation {
  std::vector<int32_t> prompt, tokens;
  bool stopped = false;
};
std::vector<Generation> greedy_generations(Gemma4Model& model, Ops& ops, const std::vector<std::vector<int32_t>>& prompts,
                                           int64_t max_new_tokens, std::span<const int32_t> stop_tokens);

// exp(mean −log p) of the generated tokens, each given its prompt, under `reference`.
double cross_perplexity(Gemma4Model& reference, const std::vector<Generation>& generations);

// What one evaluation measured; fields not computed are NaN (absent from the JSON).
struct EvalMeasures {
  double eval_loss = NAN, perplexity = NAN, cross_perplexity = NAN, mc_accuracy = NAN, mc_accuracy_norm = NAN;
  // Against the parent on the held-out targets (HeldOut): mean KL(p_parent ‖ p_model) in nats
  // per target, and the share of targets whose argmax is the parent's.
  double kl_parent = NAN, top1_parent = NAN;
  GenerationScores generation;  // means; count 0 when no generations were made
  nlohmann::json to_json() const;
  static EvalMeasures from_json(const nlohmann::json& j);
};
// Fills the generation fields from a set of generations.
void score_generations(EvalMeasures& m, const std::vector<Generation>& generations);

// The prompt to continue for a held-out example: its tokens before the first trained one
// (for chat data, everything up to and including the model turn's opening). When every
// token is trained (plain text), its first half, at most 64 tokens. At most `max_len`
// tokens are kept (the tail). Empty when the example has fewer than two tokens.
std::vector<int32_t> generation_prompt(const Example& e, int64_t max_len);

}  // namespace tl
