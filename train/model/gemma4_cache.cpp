// KV-cached decoding for Gemma4Model: the same layers as forward_hidden (gemma4_model.cpp),
// with each attention reading the keys of earlier steps from a KvCache.
#include <cstring>

#include "train/model/gemma4_model.h"

namespace tl {

KvCache Gemma4Model::make_cache() const {
  KvCache c;
  c.layers.resize(size_t(config_.num_hidden_layers));
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    const LayerGeometry& g = config_.layer(i);
    if (g.kv_source >= 0) continue;  // reads its source layer's cache
    KvCache::Layer& l = c.layers[size_t(i)];
    l.ring = g.type == LayerType::Sliding ? config_.sliding_window : 0;
    const int64_t capacity = l.ring > 0 ? l.ring : 64;  // full layers grow by doubling
    l.k = Tensor::zeros({capacity, g.num_kv_heads * g.head_dim}, ops_.act_dtype());
    l.v = Tensor::zeros({capacity, g.num_kv_heads * g.head_dim}, ops_.act_dtype());
    l.pos.assign(size_t(capacity), -1);
  }
  return c;
}

namespace {
void copy_row(const Tensor& src, int64_t from, Tensor& dst, int64_t to) {
  const size_t row = size_t(src.dim(1)) * dtype_size(src.dtype());
  std::memcpy(static_cast<char*>(dst.raw()) + size_t(to) * row, static_cast<const char*>(src.raw()) + size_t(from) * row,
              row);
}

// Doubles a growing layer's capacity until slot `need` exists.
void grow(KvCache::Layer& l, int64_t need) {
  int64_t cap = l.k.dim(0);
  if (need < cap) return;
  while (cap <= need) cap *= 2;
  for (Tensor* t : {&l.k, &l.v}) {
    Tensor bigger = Tensor::zeros({cap, t->dim(1)}, t->dtype());
    std::memcpy(bigger.raw(), t->raw(), t->nbytes());
    *t = bigger;
  }
  l.pos.resize(size_t(cap), -1);
}
}  // namespace

void Gemma4Model::cached_attention(int i, ForwardState& st, LayerTape& t) {
  const LayerGeometry& g = config_.layer(i);
  KvCache& cache = *st.cache;
  const int64_t S = st.S, d = g.head_dim, nh = config_.num_attention_heads;
  Tensor q_pos = Tensor::zeros({S}, DType::I32);
  for (int64_t s = 0; s < S; ++s) q_pos.data<int32_t>()[s] = int32_t(cache.length + s);

  if (g.kv_source < 0) {
    // Keys this step attends over: the cached ones, then the new rows. Only then do the new
    // rows enter the cache, so a prompt longer than the ring still sees its own window.
    KvCache::Layer& l = cache.layers[size_t(i)];
    const Tensor k_new = ops_.download(t.k), v_new = ops_.download(t.v);
    std::vector<int64_t> held;
    for (size_t j = 0; j < l.pos.size(); ++j)
      if (l.pos[j] >= 0) held.push_back(int64_t(j));
    const int64_t m = int64_t(held.size()), w = k_new.dim(1);
    Tensor K = Tensor::zeros({m + S, w}, k_new.dtype()), V = Tensor::zeros({m + S, w}, k_new.dtype());
    Tensor k_pos = Tensor::zeros({m + S}, DType::I32);
    for (int64_t j = 0; j < m; ++j) {
      copy_row(l.k, held[size_t(j)], K, j);
      copy_row(l.v, held[size_t(j)], V, j);
      k_pos.data<int32_t>()[j] = l.pos[size_t(held[size_t(j)])];
    }
    for (int64_t s = 0; s < S; ++s) {
      copy_row(k_new, s, K, m + s);
      copy_row(v_new, s, V, m + s);
      const int32_t p = q_pos.data<int32_t>()[s];
      k_pos.data<int32_t>()[m + s] = p;
      const int64_t slot = l.ring > 0 ? p % l.ring : p;  // a ring overwrites position p − window
      if (l.ring == 0) grow(l, slot);
      copy_row(k_new, s, l.k, slot);
      copy_row(v_new, s, l.v, slot);
      l.pos[size_t(slot)] = p;
    }
    st.kv[size_t(i)] = {ops_.upload(K, ops_.act_dtype()), ops_.upload(V, ops_.act_dtype())};
    st.kv_pos[size_t(i)] = k_pos;
  }
  const size_t src = size_t(g.kv_source < 0 ? i : g.kv_source);
  const auto& [k, v] = st.kv[src];
  const int64_t window = g.type == LayerType::Sliding ? config_.sliding_window : 0;
  ops_.attention_cached_forward(t.q.view({S, nh, d}), k.view({k.dim(0), k.dim(1) / d, d}),
                                v.view({v.dim(0), v.dim(1) / d, d}), q_pos, st.kv_pos[src], window, t.attn);
}

Tensor Gemma4Model::forward_cached(std::span<const int32_t> ids, KvCache& cache) {
  if (ids.empty()) throw Error("forward_cached: no tokens to add");
  if (cache.layers.size() != size_t(config_.num_hidden_layers))
    throw Error("forward_cached: the cache was made for another model");
  const int64_t S = int64_t(ids.size());
  Tensor tokens = Tensor::zeros({1, S}, DType::I32), positions = Tensor::zeros({1, S}, DType::I32);
  for (int64_t s = 0; s < S; ++s) {
    tokens.data<int32_t>()[s] = ids[size_t(s)];
    positions.data<int32_t>()[s] = int32_t(cache.length + s);
  }
  ForwardState st;
  st.cache = &cache;
  st.kv_pos.assign(size_t(config_.num_hidden_layers), {});
  forward(Batch{tokens, positions, {}}, st, false, nullptr);
  cache.length += S;
  return st.hidden;
}

}  // namespace tl
