// Model surgery driven by one layer map: output layer i ← (source layer, copy | identity).
// From it come the tensor renames, the per-layer-embedding column/row blocks, layer_types,
// per_layer_config, num_kv_shared_layers and num_hidden_layers (recipes.md §1–§2).
#pragma once
#include <filesystem>
#include <optional>
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
// rewritten, tokenizer files copied, and torchless_surgery.json recording the map and the
// source directory (as an absolute path).
SurgeryReport apply_layer_map(const std::filesystem::path& src, const std::filesystem::path& out, const LayerMap& map,
                              IdentityMode mode, bool keep_kv_producers, bool force);

// What torchless_surgery.json says about a model apply_layer_map wrote: the source
// directory (absolute since issue 24; older records hold the path as it was given) and the
// layer map. nullopt when `model_dir` has no record; a record that is not JSON, or whose map
// is malformed, is a tl::Error naming the file.
struct SurgeryRecord {
  std::filesystem::path source;
  LayerMap map;
};
std::optional<SurgeryRecord> read_surgery_record(const std::filesystem::path& model_dir);

// The parent's layer order in a model made by `map` (what Gemma4Model::parent_view takes):
// for each source layer j < parent_layers, the first output layer that is a copy of j (never
// an identity layer, never one in `trained`, whose weights change during training). nullopt,
// with `why` set, when some parent layer has no such copy (then the parent's forward needs
// its own weights).
std::optional<std::vector<int>> parent_layer_order(const LayerMap& map, int parent_layers,
                                                   const std::vector<int>& trained, std::string& why);

}  // namespace tl
