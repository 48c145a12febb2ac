// Decoding with a KV cache (greedy and sampled), and the prompt and stop-token helpers the
// trainer's and torchless-eval's generation checks use (recipes.md §2: the raw upscale loops
// under greedy decoding; the heal must make it coherent again). Measures of the generated
// text are in train/eval/text_measures.h.
#pragma once
#include <cstdint>
#include <filesystem>
#include <random>
#include <span>
#include <vector>

#include "core/tokenizer.h"
#include "train/model/gemma4_model.h"

namespace tl {

struct GreedyResult {
  std::vector<int32_t> tokens;  // generated tokens, without the prompt (a stop token included)
  bool stopped = false;         // ended on a stop token rather than at max_new_tokens
};

// Sampling settings, applied to each step's logits in this order (as transformers' logits
// processors and llama.cpp's samplers do): repetition penalty, DRY, temperature, top-k,
// top-p, min-p; then a draw. temperature 0 is greedy (argmax; the penalties still apply).
struct SamplingOptions {
  double temperature = 0.0;
  int64_t top_k = 0;                // 0: off
  double top_p = 1.0;               // 1: off
  double min_p = 0.0;               // 0: off
  double repetition_penalty = 1.0;  // CTRL (Keskar et al. 2019): 1: off
  // DRY ("don't repeat yourself", text-generation-webui / llama.cpp): a token that would
  // extend a repeat of n ≥ allowed_length tokens loses multiplier · base^(n − allowed_length).
  double dry_multiplier = 0.0;      // 0: off
  double dry_base = 1.75;
  int64_t dry_allowed_length = 2;
  std::vector<int32_t> dry_breakers;  // tokens a repeat may not run across (e.g. newline)
  uint64_t seed = 0;
};

// Generation with a KV cache: the prompt in one cached forward, then one token per step.
GreedyResult generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                      const SamplingOptions& options, std::span<const int32_t> stop_tokens = {});

// Greedy decoding (argmax, the lowest id on a tie, as torch.argmax) with the KV cache.
GreedyResult greedy_generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                             std::span<const int32_t> stop_tokens = {});
// The same without a cache: each step runs the whole sequence again (the reference the cache
// is tested against). The model's training mode is left as it was.
GreedyResult greedy_generate_uncached(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt,
                                      int64_t max_new_tokens, std::span<const int32_t> stop_tokens = {});

// CTRL's penalty on every token of `context`: a logit x becomes x/p when x > 0, else x·p.
void apply_repetition_penalty(std::vector<double>& logits, std::span<const int32_t> context, double penalty);
// DRY: for each earlier occurrence of the context's last tokens, the token that followed it
// would extend the repeat; its logit drops by multiplier · base^(n − allowed_length), n the
// longest such repeat (≥ allowed_length), a breaker ending the match.
void apply_dry(std::vector<double>& logits, std::span<const int32_t> context, const SamplingOptions& o);
// The distribution a draw uses after temperature, top-k, top-p (the smallest set of most
// likely tokens whose probability reaches top_p) and min-p (tokens below min_p · the top
// probability removed): probabilities summing to 1, zeros for removed tokens.
std::vector<double> sampling_distribution(const std::vector<double>& logits, const SamplingOptions& o);

// Tokens that end a generation for the model in `model_dir`: eos_token_id of
// generation_config.json and of config.json (an id or a list), and the tokenizer's <eos>
// and end-of-turn token <turn|> where it has them.
std::vector<int32_t> stop_tokens_for(const std::filesystem::path& model_dir, const Tokenizer& tok);

}  // namespace tl
