// torchless-forward --output against the transformers fixtures: the logits it writes are
// transformers' logits (fp32 and fp64), and its per-token log-probabilities are the
// log-softmax of transformers' logits at the next input token, whose mean over the labelled
// targets is transformers' loss.
#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "core/safetensors.h"
#include "golden_util.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

struct Out {
  SafetensorsFile file;
  SafetensorsFile rec;
};

Out run_forward(const std::string& variant, const std::string& dtype) {
  const std::string dir = test::golden(variant);
  const fs::path out = fs::temp_directory_path() / fmt::format("tl_fwd_out_{}_{}_{}.safetensors", ::getpid(), variant, dtype);
  const std::string cmd = fmt::format("'{}/torchless-forward' --model '{}' --input '{}/forward.safetensors' --dtype {} "
                                      "--output '{}' >/dev/null",
                                      TL_TOOLS_DIR, dir, dir, dtype, out.string());
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  Out o{SafetensorsFile::open(out), SafetensorsFile::open(dir + "/forward.safetensors")};
  fs::remove(out);  // the mapping stays valid
  return o;
}

// Reference log-probabilities from transformers' logits [B, S, V]: log_softmax in double.
double ref_logprob(const Tensor& logits, int64_t row, int64_t V, int64_t token) {
  double mx = -INFINITY, sum = 0;
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits.get(row * V + v));
  for (int64_t v = 0; v < V; ++v) sum += std::exp(logits.get(row * V + v) - mx);
  return logits.get(row * V + token) - mx - std::log(sum);
}

void check(const std::string& variant, const std::string& dtype, const std::string& logits_key,
           const std::string& loss_key, double tol) {
  Out o = run_forward(variant, dtype);
  Tensor ids = o.rec.get("input_ids"), labels = o.rec.get("labels"), ref = o.rec.get(logits_key);
  Tensor logits = o.file.get("logits"), lp = o.file.get("logprobs");
  const int64_t B = ids.dim(0), S = ids.dim(1), V = ref.dim(2);
  ASSERT_EQ(logits.shape(), ref.shape());
  ASSERT_EQ(lp.shape(), (Shape{B, S - 1}));
  EXPECT_EQ(logits.dtype(), dtype == "f64" ? DType::F64 : DType::F32);
  auto d = test::compare(o.file.get("input_ids"), ids);
  EXPECT_EQ(d.max_abs, 0.0);

  d = test::compare(logits, ref);
  EXPECT_LE(d.max_abs, tol * d.max_ref) << variant << " " << dtype << " logits max|diff| " << d.max_abs;

  double worst = 0, nll = 0;
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < S; ++t) {
      const double want = ref_logprob(ref, b * S + t, V, int64_t(ids.get(b * S + t + 1)));
      const double got = lp.get(b * (S - 1) + t);
      worst = std::max(worst, std::abs(got - want));
      if (labels.get(b * S + t + 1) != -100) nll -= got, ++n;  // labels equal input_ids where set
    }
  EXPECT_LE(worst, 2 * tol * d.max_ref) << variant << " " << dtype << " logprobs";
  const double loss = o.rec.get(loss_key).get(0);
  ASSERT_GT(n, 0);
  EXPECT_NEAR(nll / double(n), loss, tol * std::abs(loss)) << variant << " " << dtype << " loss from logprobs";
}

TEST(ForwardOutput, F32LogitsAndLogprobsMatchTransformers) {
  for (const char* v : {"e2b", "dense_kv", "e4b", "moe"}) check(v, "f32", "logits", "loss", 1e-5);
}

TEST(ForwardOutput, F64LogitsAndLogprobsMatchTransformersFloat64) {
  for (const char* v : {"e2b", "dense_kv"}) check(v, "f64", "logits_fp64", "loss_fp64", 1e-10);
}

}  // namespace
}  // namespace tl
