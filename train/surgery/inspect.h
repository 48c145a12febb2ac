// Diagnostics for a healed model (recipes.md §1): per layer, whether it was inserted as an
// identity (from torchless_surgery.json), the norms of the weights that started at zero
// (o_proj, down_proj; ‖·‖_F), each LoRA module's ‖B‖_F, and the layer's residual
// contribution ‖out − in‖ / ‖in‖ averaged over the tokens of sample text.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace tl {

struct LayerReport {
  int layer = 0;
  std::string type;              // sliding_attention / full_attention
  bool inserted = false;         // an identity insert of the surgery that made the model
  double o_proj_norm = 0, down_proj_norm = 0;
  std::vector<std::pair<std::string, double>> lora_b_norms;  // module → ‖B‖_F
  double residual_contribution = 0;
};

// `adapter` may be empty; `sample_ids` are token sequences to run (may be empty).
std::vector<LayerReport> inspect_model(const std::filesystem::path& model, const std::filesystem::path& adapter,
                                       const std::vector<std::vector<int32_t>>& sample_ids);

std::string format_inspection(const std::vector<LayerReport>& layers);

}  // namespace tl
