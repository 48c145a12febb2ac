// Which KV-sharing layouts llama.cpp runs, and runs with the numbers transformers gives.
//
// transformers (and torchless, gemma4.md §4.5) let a KV-shared layer read the K/V of the last
// layer with its own K/V *of the same attention type*. llama.cpp (src/llama-model.cpp, the
// memory's layer-reuse callback for LLM_ARCH_GEMMA4, as vendored in llama-cpp-python 0.3.36)
// does not look at types: with N = num_hidden_layers − num_kv_shared_layers layers that own
// K/V, a shared full_attention layer reads layer N−1 and a shared sliding_attention layer reads
// layer N−2 (and it asserts N ≥ 2). Where that layer is of the other type, creating a context
// aborts (`GGML_ASSERT(map_layer_ids.find(il_reuse) != map_layer_ids.end())`, the sliding and
// full caches are separate); where it is of the same type but not the last one, llama.cpp runs
// and reads other K/V than transformers. The released E2B/E4B end their own-K/V layers with
// "…, sliding, full", which satisfies both.
#pragma once
#include <string>

#include "core/config.h"

namespace tl {

// The rule as one line, for messages.
extern const char* const kLlamaCppKvRule;

// "" when llama.cpp runs `c` reading the same K/V as transformers (always so without KV
// sharing); else one line naming the first shared layer at fault and the rule.
std::string llama_cpp_kv_problem(const Gemma4Config& c);

// The line surgery commands print: "llama.cpp: KV-sharing layout runnable (…)" or
// "llama.cpp: cannot run this KV-sharing layout: …".
std::string llama_cpp_kv_summary(const Gemma4Config& c);

}  // namespace tl
