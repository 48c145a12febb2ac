// Data parallelism on top of Comm: the start-up agreement check, bucketed gradient
// all-reduce, and the trainable weights' fingerprint that checks the ranks stay in sync.
#pragma once
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "core/ops.h"
#include "train/dist/comm.h"
#include "train/model/param_slot.h"

namespace tl {

// 64-bit FNV-1a: a fingerprint for comparing bytes across ranks (not a security hash).
uint64_t fnv1a(const void* data, size_t n, uint64_t h = 0xcbf29ce484222325ull);
uint64_t fnv1a_file(const std::filesystem::path& path);

// Compares every rank's pairs with rank 0's (one all-gather each); on a difference every
// rank throws the same AgreedError naming the first rank and item that differ.
void check_ranks_agree(Comm& comm, const std::vector<std::pair<std::string, uint64_t>>& items);

// Fingerprint of the trainable values (downloaded), for checking ranks hold the same weights.
uint64_t weights_fingerprint(Ops& ops, const std::vector<ParamSlot>& params);

// The trainable gradients grouped into flat buckets of about bucket_bytes, filled in the
// order the backward finishes them (last layer first). A bucket's all-reduce starts as soon
// as the backward reports its lowest layer done (layer_done), so on the GPU it overlaps the
// rest of the backward; finish() starts what is left (embeddings, norms outside layers) and
// waits for all of them.
class GradBuckets {
 public:
  GradBuckets(const std::vector<ParamSlot>& params, Comm& comm, size_t bucket_bytes);
  void layer_done(int layer);
  void finish();
  size_t size() const { return buckets_.size(); }
  size_t elems(size_t i) const { return buckets_[i].elems; }

 private:
  Comm& comm_;
  std::vector<GradBucket> buckets_;
  std::vector<int> ready_layer_;  // start bucket i once this layer is done (-1: at finish)
};

// The decoder layer a trainable tensor belongs to ("…layers.<i>.…"), or -1.
int layer_of(const std::string& name);

}  // namespace tl
