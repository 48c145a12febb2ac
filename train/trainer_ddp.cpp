// The trainer's data-parallel parts: which rows each rank trains on, one resume point for
// all ranks, rank 0's writes behind one barrier, and the weights-in-sync check.
#include <fmt/format.h>

#include <algorithm>
#include <fstream>

#include "train/trainer.h"

namespace tl {

namespace fs = std::filesystem;

namespace {
// A safetensors header: the 8-byte length and the JSON (names, dtypes, shapes, offsets).
uint64_t safetensors_header_fingerprint(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  uint64_t len = 0;
  if (!in.read(reinterpret_cast<char*>(&len), 8) || len > (uint64_t(1) << 30))
    throw Error(fmt::format("{}: not a safetensors file", path.string()));
  std::string header(len, '\0');
  if (!in.read(header.data(), std::streamsize(len))) throw Error(fmt::format("{}: truncated header", path.string()));
  return fnv1a(header.data(), header.size(), fnv1a(&len, 8));
}
}  // namespace

std::vector<std::pair<std::string, uint64_t>> startup_fingerprints(const TrainConfig& cfg,
                                                                   const std::vector<std::string>& overrides) {
  std::vector<std::pair<std::string, uint64_t>> out;
  uint64_t h = fnv1a_file(cfg.source);
  for (const std::string& o : overrides) h = fnv1a(o.data(), o.size() + 1, h);  // with the NUL: "a=b" "c" ≠ "a" "=bc"
  out.push_back({fmt::format("config ({} and its overrides)", cfg.source.string()), h});
  for (size_t i = 0; i < cfg.datasets.size(); ++i)
    out.push_back({fmt::format("data file {} ({})", i + 1, cfg.datasets[i].path), fnv1a_file(cfg.datasets[i].path)});
  // A checkpoint's index: config.json, each shard's name and header, the shard index.
  auto index = [](const fs::path& dir) {
    uint64_t idx = fnv1a_file(dir / "config.json");
    std::vector<fs::path> shards;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") shards.push_back(e.path());
    std::sort(shards.begin(), shards.end());
    for (const fs::path& s : shards) {
      const std::string n = s.filename().string();
      idx = fnv1a(n.data(), n.size(), idx);
      const uint64_t sh = safetensors_header_fingerprint(s);
      idx = fnv1a(&sh, 8, idx);
    }
    if (fs::exists(dir / "model.safetensors.index.json")) {
      const uint64_t ih = fnv1a_file(dir / "model.safetensors.index.json");
      idx = fnv1a(&ih, 8, idx);
    }
    return idx;
  };
  out.push_back({fmt::format("base checkpoint index of {}", cfg.base_model), index(cfg.base_model)});
  // The teacher every rank distils from (auto: found through upscale_from or base_model's
  // surgery record, both covered above).
  if (!cfg.distill_from.empty() && cfg.distill_from != "auto" && fs::is_directory(cfg.distill_from))
    out.push_back({fmt::format("parent checkpoint index of {}", cfg.distill_from), index(cfg.distill_from)});
  return out;
}


void Trainer::setup_ddp() {
  if (comm_->world() == 1) return;
  buckets_ = std::make_unique<GradBuckets>(optimizer_->params(), *comm_,
                                           size_t(cfg_.ddp_bucket_mb * double(1 << 20)));
  size_t elems = 0;
  for (size_t i = 0; i < buckets_->size(); ++i) elems += buckets_->elems(i);
  log_ << fmt::format("data parallel    {} (rank {}), global batch {} rows = micro-batch {} × accumulation {} × {} "
                      "ranks; gradients in {} buckets ({:.1f} MiB)\n",
                      comm_->name(), comm_->rank(),
                      cfg_.micro_batch_size * cfg_.gradient_accumulation_steps * comm_->world(),
                      cfg_.micro_batch_size, cfg_.gradient_accumulation_steps, comm_->world(), buckets_->size(),
                      double(elems * sizeof(float)) / double(1 << 20));
}

std::vector<MicroBatch> Trainer::next_step_batches() {
  // Every rank walks the whole global batch so the data position (epoch, cursor) is the
  // same everywhere and a checkpoint's position resumes any rank exactly; a rank builds
  // only its own micro-batches. With one rank this is the plain accumulation loop.
  std::vector<MicroBatch> micro;
  const int64_t accum = cfg_.gradient_accumulation_steps;
  for (int64_t m = 0; m < accum * comm_->world(); ++m) {
    const bool mine = m / accum == comm_->rank();
    MicroBatch mb = next_micro_batch(mine);
    if (mine) micro.push_back(std::move(mb));
  }
  return micro;
}

fs::path Trainer::agree_resume_dir(const fs::path& chosen) {
  if (comm_->world() == 1) return chosen;
  // Rank 0's choice (the newest checkpoint it sees, or the configured one) for everyone:
  // ranks on other nodes could list output_dir at another moment.
  const std::string name = chosen.filename().string();
  const bool numbered = name.starts_with("checkpoint-") && name.size() > 11 &&
                        name.find_first_not_of("0123456789", 11) == std::string::npos;
  int64_t step = chosen.empty() ? -1 : numbered ? std::stoll(name.substr(11)) : -2;
  comm_->broadcast_host(&step, sizeof step, 0, "resume point broadcast");
  if (step == -1) return {};
  if (step == -2) return chosen;  // a configured directory of another name: the same path on every rank
  const fs::path dir = cfg_.resume_from_checkpoint == "auto"
                           ? fs::path(cfg_.output_dir) / fmt::format("checkpoint-{}", step)
                           : chosen;
  if (!fs::is_directory(dir))
    throw Error(fmt::format("rank {}: rank 0 resumes from {} but this rank does not see it (output_dir must be "
                            "shared by every node)",
                            comm_->rank(), dir.string()));
  return dir;
}

void Trainer::save_checkpoint_ranks() {
  on_writer("checkpoint save", [&] { save_checkpoint(); });
}

void Trainer::check_sync(nlohmann::json& rec) {
  if (cfg_.ddp_check_sync_steps <= 0 || state_.step % cfg_.ddp_check_sync_steps != 0) return;
  const uint64_t mine = weights_fingerprint(ops_, optimizer_->params());
  const std::vector<uint64_t> all = comm_->all_gather_host(mine, "weights fingerprint gather");
  for (int r = 1; r < comm_->world(); ++r)
    if (all[size_t(r)] != all[0])
      throw AgreedError(fmt::format("step {}: rank {}'s trainable weights differ from rank 0's (fingerprint {:016x} "
                                    "vs {:016x}): the ranks are out of sync",
                                    state_.step, r, all[size_t(r)], all[0]));
  if (rec.is_null()) rec = {{"step", state_.step}};
  rec["weights_fingerprint"] = fmt::format("{:016x}", mine);
}

void Trainer::log_timing(double train_seconds, int64_t steps) {
  if (steps <= 0) return;
  const double comm = comm_->seconds_in_collectives();
  log_ << fmt::format("timing: {:.4f} s per step over {} steps, {:.4f} s ({:.1f}%) in collectives ({})\n",
                      train_seconds / double(steps), steps, comm / double(steps),
                      100.0 * comm / std::max(1e-9, train_seconds), comm_->name());
}

}  // namespace tl
