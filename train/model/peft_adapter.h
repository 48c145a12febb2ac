// PEFT LoRA adapters on disk (formats.md §3): adapter_config.json (keys sorted, 2-space
// indent) and adapter_model.safetensors with PEFT's tensor names,
//   base_model.model.<decoder prefix><module>.lora_A.weight  [r, in]
//   base_model.model.<decoder prefix><module>.lora_B.weight  [out, r]
// and target selection with PEFT's matching rules, restricted to the text decoder.
#pragma once
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "train/model/lora.h"

namespace tl {

// Decoder weight names ("layers.0.self_attn.q_proj.weight") that the spec targets, in
// model order. PEFT module names are matched with the prefix the checkpoint uses, e.g.
// "model.layers.0.self_attn.q_proj". Throws tl::Error if nothing matches.
std::vector<std::string> select_lora_targets(const Gemma4Config& c, const LoraSpec& spec,
                                             const std::string& decoder_prefix);

struct AdapterTensors {
  std::string weight;  // the base weight's decoder name, "layers.0.self_attn.q_proj.weight"
  Tensor A, B;         // host tensors
};

// Writes adapter_config.json and adapter_model.safetensors (atomically, each).
void write_peft_adapter(const std::filesystem::path& dir, const LoraSpec& spec,
                        const std::vector<AdapterTensors>& adapters, const std::string& decoder_prefix);

struct PeftAdapter {
  LoraSpec spec;
  std::vector<AdapterTensors> adapters;
};
// Reads a PEFT LoRA adapter (ours or PEFT's); tensor names may carry "model." or
// "model.language_model." after "base_model.model.". Errors name the file and the key.
PeftAdapter read_peft_adapter(const std::filesystem::path& dir);

// "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" for weight
// "layers.0.self_attn.q_proj.weight".
std::string peft_key(const std::string& weight, const std::string& decoder_prefix, char which);

}  // namespace tl
