// Model surgery driven by one layer map: output layer i ← (source layer, copy | identity).
// From it come the tensor renames, the per-layer-embedding column/row blocks, layer_types,
// per_layer_config, num_kv_shared_layers and num_hidden_layers (recipes.md §1–§2).
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "core/config.h"

namespace tl {

enum class IdentityMode { None, ZeroOut, ZeroPostnorm };

struct LayerSlot {
  int source = 0;
  bool identity = false;  // an exact identity at insertion (weights zeroed by the mode)
};
using LayerMap = std::vector<LayerSlot>;

// Command-line shortcuts (layer ranges are [begin, end), as mergekit's layer_range):
//   "40:48"                      duplicate block [40, 48) right after itself
//   "every=4"                    after every 4 layers, an identity copy of the layer before
//   "0:18,10:26,18:34,26:42"     passthrough slices
LayerMap duplicate_block(int num_layers, int begin, int end, bool identity);
LayerMap insert_identity_every(int num_layers, int every);
LayerMap slices_map(int num_layers, const std::string& slices);

// The config of the model the map produces; throws tl::Error explaining a map that breaks
// KV sharing (a shared layer outside the trailing shared block, a non-shared layer built from
// a shared one that has no K/V weights, or — with `keep_kv_producers` — a map that would put
// a new K/V producer in front of the shared layers, which changes what they read).
Gemma4Config map_config(const Gemma4Config& c, const LayerMap& map, bool keep_kv_producers);

struct SurgeryReport {
  int64_t layers_in = 0, layers_out = 0, identity_layers = 0;
};

// Writes the new checkpoint (atomically): every tensor of the source, decoder layers renamed
// or copied along the map, PLE blocks re-laid, identity layers zeroed by `mode`, config.json
// rewritten, tokenizer files copied, and torchless_surgery.json recording the map.
SurgeryReport apply_layer_map(const std::filesystem::path& src, const std::filesystem::path& out, const LayerMap& map,
                              IdentityMode mode, bool keep_kv_producers, bool force);

}  // namespace tl
