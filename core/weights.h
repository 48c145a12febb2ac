// The text decoder's tensors by their Hugging Face names and shapes, derived from the
// config alone. The loader checks a checkpoint against this list, `plan` counts parameters
// with it, and surgery renames along it.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "core/dtype.h"

namespace tl {

// Which part of the model a tensor belongs to (for plan's breakdown).
enum class Component { Embeddings, PLE, Attention, MLP, Experts, Router, Norms, LayerScalar };
const char* component_name(Component c);

struct WeightSpec {
  std::string name;   // without prefix, e.g. "layers.3.self_attn.q_proj.weight"
  Shape shape;
  Component component;
  int layer = -1;     // -1 for global tensors
  bool is_linear = false;     // a 2-D [out, in] projection (a QLoRA / LoRA target)
  bool is_parameter = true;   // false for buffers (layer_scalar)
};

// Every tensor the text decoder owns, globals first, then layer by layer.
std::vector<WeightSpec> text_decoder_weights(const Gemma4Config& c);

class Checkpoint;
// Checks that `ckpt` holds every text-decoder tensor of `c` with the right shape and a float
// dtype, under either HF prefix, reading headers only; returns how many it checked and
// throws tl::Error naming the first tensor at fault. With `allow_bnb_4bit`, a projection
// bitsandbytes stored pre-quantized passes when its quant_state's shape is the config's and
// its quantization state (absmax, nested maps; small tensors, read) is what the loader accepts
// (core/nf4.h); without, it is an error saying that a full-precision checkpoint is needed.
int64_t check_text_decoder(const Gemma4Config& c, const Checkpoint& ckpt, bool allow_bnb_4bit = false);
// Whether the tensor `full` (e.g. "model.layers.0.self_attn.q_proj.weight") is a Linear4bit
// weight that bitsandbytes stored pre-quantized: U8, with "<full>.quant_state.bitsandbytes__nf4"
// (or __fp4) beside it, as `*-bnb-4bit` checkpoints hold their projections.
bool is_bnb_4bit(const Checkpoint& ckpt, const std::string& full);
// The first pre-quantized weight of `ckpt` (a `*-bnb-4bit` checkpoint), or "" when none is.
std::string first_bnb_4bit(const Checkpoint& ckpt);
// The prefix under which `ckpt` stores the decoder ("model.language_model." or "model.").
std::string decoder_prefix(const Checkpoint& ckpt);

// HF prefixes: the multimodal wrapper stores the decoder under "model.language_model.",
// Gemma4ForCausalLM under "model.".
inline constexpr const char* kNestedPrefix = "model.language_model.";
inline constexpr const char* kPlainPrefix = "model.";

}  // namespace tl
