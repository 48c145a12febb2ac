// Greedy decoding and a repetition measure: how the trainer shows what a heal did to a
// surgically grown model (recipes.md §2: the raw upscale loops under greedy decoding; the
// heal must make it coherent again).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include <filesystem>

#include "core/tokenizer.h"
#include "train/data.h"
#include "train/gemma4_model.h"

namespace tl {

struct GreedyResult {
  std::vector<int32_t> tokens;  // generated tokens, without the prompt (a stop token included)
  bool stopped = false;         // ended on a stop token rather than at max_new_tokens
};

// Appends the argmax token (the lowest id on a tie, as torch.argmax) until a stop token or
// max_new_tokens. Each step runs the whole sequence again (no KV cache): exact, and cheap
// at the lengths an evaluation uses. The model's training mode is left as it was.
GreedyResult greedy_generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                             std::span<const int32_t> stop_tokens = {});

// seq-rep-n (Welleck et al. 2019): the share of the n-grams of `tokens` that repeat an
// earlier n-gram of the same sequence, 1 − distinct/total; 0 when there are no n-grams.
// A looping generation scores near 1, varied text near 0.
double repetition_rate(std::span<const int32_t> tokens, int n = 4);

// The prompt to continue for a held-out example: its tokens before the first trained one
// (for chat data, everything up to and including the model turn's opening). When every
// token is trained (plain text), its first half, at most 64 tokens. At most `max_len`
// tokens are kept (the tail). Empty when the example has fewer than two tokens.
std::vector<int32_t> generation_prompt(const Example& e, int64_t max_len);

// Tokens that end a generation for the model in `model_dir`: eos_token_id of
// generation_config.json and of config.json (an id or a list), and the tokenizer's <eos>
// and end-of-turn token <turn|> where it has them.
std::vector<int32_t> stop_tokens_for(const std::filesystem::path& model_dir, const Tokenizer& tok);

}  // namespace tl
