#include "train/dist/ddp.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <cctype>

#include "core/tensor.h"

namespace tl {

namespace fs = std::filesystem;

uint64_t fnv1a(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

uint64_t fnv1a_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot read", path.string()));
  uint64_t h = 0xcbf29ce484222325ull;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    h = fnv1a(buf.data(), size_t(in.gcount()), h);
  }
  return h;
}

void check_ranks_agree(Comm& comm, const std::vector<std::pair<std::string, uint64_t>>& items) {
  // Item counts first: a rank with another number of data files would misalign the rest.
  const std::vector<uint64_t> counts = comm.all_gather_host(items.size(), "start-up check (item count)");
  for (int r = 1; r < comm.world(); ++r)
    if (counts[size_t(r)] != counts[0])
      throw AgreedError(fmt::format("rank {}: its config lists {} data files, rank 0's {}: every rank must train "
                                    "on the same config and data",
                                    r, counts[size_t(r)] - 2, counts[0] - 2));
  for (const auto& [what, h] : items) {
    const std::vector<uint64_t> all = comm.all_gather_host(h, "start-up check");
    for (int r = 1; r < comm.world(); ++r)
      if (all[size_t(r)] != all[0])
        throw AgreedError(fmt::format("rank {}: {} differs from rank 0's (fingerprint {:016x} vs {:016x}): every "
                                      "rank must train on the same config, data and base model",
                                      r, what, all[size_t(r)], all[0]));
  }
}

uint64_t weights_fingerprint(Ops& ops, const std::vector<ParamSlot>& params) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const ParamSlot& p : params) {
    const Tensor host = ops.download(*p.value);
    h = fnv1a(host.raw(), host.nbytes(), h);
  }
  return h;
}

int layer_of(const std::string& name) {
  const size_t at = name.find("layers.");
  if (at == std::string::npos || (at > 0 && name[at - 1] != '.')) return -1;
  size_t i = at + 7, j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
  if (j == i || j >= name.size() || name[j] != '.') return -1;
  return std::stoi(name.substr(i, j - i));
}

GradBuckets::GradBuckets(const std::vector<ParamSlot>& params, Comm& comm, size_t bucket_bytes) : comm_(comm) {
  // Backward order: highest layer first, tensors outside layers (embeddings, final norm)
  // last, since the backward reaches them after layer 0.
  std::vector<std::pair<int, const ParamSlot*>> order;
  for (const ParamSlot& p : params) {
    if (p.grad->dtype() != DType::F32)
      throw Error(fmt::format("{}: gradient all-reduce needs F32 gradients, not {}", p.name, dtype_name(p.grad->dtype())));
    order.push_back({layer_of(p.name), &p});
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    const int ka = a.first < 0 ? -1 : a.first, kb = b.first < 0 ? -1 : b.first;
    return ka > kb;
  });
  const size_t cap = std::max<size_t>(1, bucket_bytes / sizeof(float));
  std::vector<const void*> seen;  // tied tensors share one gradient: reduce it once
  for (const auto& [layer, p] : order) {
    if (std::find(seen.begin(), seen.end(), p->grad->raw()) != seen.end()) continue;
    seen.push_back(p->grad->raw());
    const size_t n = size_t(p->grad->numel());
    // A bucket closes at a layer boundary once full, so each is ready when one layer ends.
    if (buckets_.empty() || (buckets_.back().elems >= cap && ready_layer_.back() != layer)) {
      buckets_.emplace_back();
      ready_layer_.push_back(layer);
    }
    buckets_.back().parts.push_back({p->grad->data<float>(), n});
    buckets_.back().elems += n;
    ready_layer_.back() = layer;  // the lowest layer in it so far (descending order)
  }
}

void GradBuckets::layer_done(int layer) {
  for (size_t i = 0; i < buckets_.size(); ++i)
    if (ready_layer_[i] == layer && !buckets_[i].in_flight) comm_.start_bucket(buckets_[i]);
}

void GradBuckets::finish() {
  // In bucket order on every rank: the same sequence of collectives everywhere.
  for (auto& b : buckets_)
    if (!b.in_flight) comm_.start_bucket(b);
  for (auto& b : buckets_) comm_.finish_bucket(b);
}

}  // namespace tl
