// What a tool checks about an input before it allocates for it, as the trainer's attention
// pre-flight does for its rows: the model's context length (max_position_embeddings), and
// whether the largest buffers of the forward pass fit in this machine's memory. Without these a
// long text grew until std::bad_alloc (inside a parallel loop, where it cannot be caught) and a
// huge --max-new-tokens ran for minutes. Each refusal is one line naming the limit and the
// setting to change.
#pragma once
#include <cstdint>
#include <string>

#include "core/config.h"

namespace tl {

// Refuses `tokens` positions beyond the model's context:
// "<what>: <tokens> tokens, more than the model's context of <C> (max_position_embeddings in
// <config_file>); <fix>".
void refuse_over_context(const Gemma4Config& c, const std::string& config_file, int64_t tokens,
                         const std::string& what, const std::string& fix);

// --max-new-tokens as given (a double, so that "1e9" reaches this check rather than a parser's
// "could not convert"): a whole number from 1 to the model's context, else a tl::Error naming it.
int64_t checked_max_new_tokens(double requested, const Gemma4Config& c, const std::string& config_file);

// The bytes the largest buffers of one forward pass over [batch, seq] take at once: one
// attention block's scores per thread (G heads × 128 queries × S keys), the residual stream and one layer's
// projections and MLP, and the logits (of every position when `all_logits`, else of one row
// per sequence) times `logit_copies` (a tool that keeps a converted copy or a reference).
double forward_peak_bytes(const Gemma4Config& c, int64_t batch, int64_t seq, int64_t act_bytes, bool all_logits,
                          int logit_copies = 1);
// The key/value cache of a generation of `tokens` positions (sliding layers keep a window).
double kv_cache_bytes(const Gemma4Config& c, int64_t tokens, int64_t act_bytes);

double physical_memory_bytes();
// Refuses `need` bytes beyond physical memory: "<what>: needs about X GiB (<detail>) but the
// machine has Y GiB; <fix>".
void refuse_over_memory(double need, const std::string& detail, const std::string& what, const std::string& fix);

}  // namespace tl
