// safetensors: round trips, byte identity with Python's writer, sharded checkpoints, atomic
// writes. Malformed inputs are in test_safetensors_malformed.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "core/half.h"
#include "core/safetensors.h"
#include "tests/safetensors_test_util.h"

namespace tl {
namespace {

using st_test::expect_error;
using st_test::read_bytes;
using st_test::read_string;
using st_test::same_bytes;
using Safetensors = st_test::ScratchDir;

const fs::path kGolden = fs::path(TL_SOURCE_DIR) / "tests" / "golden";

// A tensor whose bytes are a simple pattern, distinct per dtype.
Tensor pattern(Shape shape, DType dt, uint8_t seed) {
  Tensor t = Tensor::zeros(std::move(shape), dt);
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(seed + 37 * i);
  if (dt == DType::BOOL)
    for (size_t i = 0; i < t.nbytes(); ++i) p[i] &= 1;
  return t;
}

const DType kAllDtypes[] = {DType::BF16, DType::F16, DType::F32, DType::F64, DType::U8,
                            DType::I8,   DType::I16, DType::U16, DType::I32, DType::U32,
                            DType::I64,  DType::U64, DType::BOOL};

TEST_F(Safetensors, RoundTripEveryDtypeScalarAndEmpty) {
  std::vector<NamedTensor> ts;
  uint8_t seed = 1;
  for (DType dt : kAllDtypes) {
    std::string n(dtype_name(dt));
    ts.push_back({n + ".matrix", pattern({2, 3}, dt, seed++)});
    ts.push_back({n + ".scalar", pattern({}, dt, seed++)});
    ts.push_back({n + ".empty", pattern({0, 3}, dt, seed++)});
  }
  fs::path p = dir / "all.safetensors";
  write_safetensors(p, ts);
  SafetensorsFile f = SafetensorsFile::open(p);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ(f.entries().size(), ts.size());
  for (const auto& t : ts) {
    ASSERT_TRUE(f.contains(t.name)) << t.name;
    Tensor back = f.get(t.name);
    EXPECT_TRUE(same_bytes(back, t.tensor)) << t.name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(back.raw()) % dtype_size(t.tensor.dtype()), 0u) << t.name;
  }
  // The in-memory image parses the same, and serialising is deterministic.
  auto bytes = std::make_shared<const std::vector<uint8_t>>(serialize_safetensors(ts));
  EXPECT_EQ(*bytes, read_bytes(p));
  SafetensorsFile g = SafetensorsFile::parse(bytes, "image");
  for (const auto& t : ts) EXPECT_TRUE(same_bytes(g.get(t.name), t.tensor)) << t.name;
  // Views keep the mapping alive after the file object is gone.
  Tensor kept = SafetensorsFile::open(p).get("F32.matrix");
  EXPECT_TRUE(same_bytes(kept, ts[6].tensor));
}

TEST_F(Safetensors, HeaderLayoutMatchesTheRustWriter) {
  Tensor f = pattern({2, 3}, DType::F32, 0), h = pattern({1}, DType::BF16, 0);
  Tensor l = pattern({1}, DType::I64, 0), b = pattern({3}, DType::BOOL, 0);
  auto bytes = serialize_safetensors({{"z", f}, {"a", f}, {"h", h}, {"l", l}, {"b", b}});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  std::string header(bytes.begin() + 8, bytes.begin() + 8 + long(n));
  // dtype descending in the Rust enum order (I64 > F32 > BF16 > BOOL), then name.
  std::string want =
      R"({"__metadata__":{"format":"pt"},"l":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]},)"
      R"("z":{"dtype":"F32","shape":[2,3],"data_offsets":[32,56]},)"
      R"("h":{"dtype":"BF16","shape":[1],"data_offsets":[56,58]},)"
      R"("b":{"dtype":"BOOL","shape":[3],"data_offsets":[58,61]}})";
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(header.substr(0, want.size()), want);
  EXPECT_EQ(header.find_first_not_of(' ', want.size()), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + n + 61);
}

TEST_F(Safetensors, NamesAreEscapedAndMetadataIsOptional) {
  std::string odd = "q\"uote\\back\nline\x01 \xc3\xa9\xf0\x9f\x98\x80";  // é and an emoji
  Tensor t = pattern({2}, DType::F32, 3);
  auto bytes = serialize_safetensors({{odd, t}}, {});
  std::string all(bytes.begin(), bytes.end());
  EXPECT_EQ(all.find("__metadata__"), std::string::npos);
  EXPECT_NE(all.find(R"("q\"uote\\back\nline\u0001 )"
                     "\xc3\xa9\xf0\x9f\x98\x80\""),
            std::string::npos);
  auto f = SafetensorsFile::parse(std::make_shared<const std::vector<uint8_t>>(bytes), "odd");
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_TRUE(same_bytes(f.get(odd), t));
}

TEST_F(Safetensors, WriterRejectsDuplicatesAndBadNames) {
  Tensor t = pattern({1}, DType::F32, 0);
  expect_error(
      [&] {
        serialize_safetensors({{"a", t}, {"a", t.to(DType::BF16)}});
      },
      {"duplicate tensor name", "\"a\""});
  expect_error([&] { serialize_safetensors({{"__metadata__", t}}); }, {"__metadata__"});
  expect_error([&] { serialize_safetensors({{"bad\xff", t}}); }, {"not valid UTF-8"});
  expect_error([&] { serialize_safetensors({{"u", Tensor()}}); }, {"\"u\"", "undefined"});
}

TEST_F(Safetensors, EntriesKeepHeaderOrderAndLookupFailsClearly) {
  std::string h = R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},)"
                  R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  auto f = SafetensorsFile::parse(
      std::make_shared<const std::vector<uint8_t>>(st_test::raw_file(h, 2)), "order.st");
  ASSERT_EQ(f.entries().size(), 2u);
  EXPECT_EQ(f.entries()[0].name, "b");
  EXPECT_EQ(f.entries()[1].name, "a");
  expect_error([&] { f.get("missing"); }, {"order.st", "no tensor named \"missing\""});
}

// ------------------------------------------------------------------- atomic writes

TEST_F(Safetensors, WriteIntoMissingDirectoryFailsAndLeavesNothing) {
  fs::path p = dir / "no" / "such" / "x.safetensors";
  expect_error(
      [&] {
        write_safetensors(p, {{"a", pattern({1}, DType::F32, 0)}});
      },
      {p.string(), "No such file or directory"});
  EXPECT_FALSE(fs::exists(dir / "no"));
}

TEST_F(Safetensors, FailedRenameRemovesTheTmpFile) {
  fs::path p = dir / "x.safetensors";
  fs::create_directories(p / "occupied");  // a non-empty directory cannot be renamed over
  expect_error(
      [&] {
        write_safetensors(p, {{"a", pattern({1}, DType::F32, 0)}});
      },
      {p.string(), "rename"});
  EXPECT_FALSE(fs::exists(dir / "x.safetensors.tmp"));
}

TEST_F(Safetensors, SuccessfulWriteLeavesNoTmpAndReplacesTheFile) {
  fs::path p = dir / "x.safetensors";
  write_safetensors(p, {{"a", pattern({1}, DType::F32, 0)}});
  write_safetensors(p, {{"b", pattern({2}, DType::F32, 0)}});
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"x.safetensors"});
  EXPECT_TRUE(SafetensorsFile::open(p).contains("b"));
}

// ------------------------------------------------------------------- checkpoints

TEST(NaturalLess, ComparesDigitRunsAsNumbers) {
  EXPECT_TRUE(natural_less("layers.2.w", "layers.10.w"));
  EXPECT_FALSE(natural_less("layers.10.w", "layers.2.w"));
  EXPECT_TRUE(natural_less("a", "b"));
  EXPECT_TRUE(natural_less("a", "a.0"));
  EXPECT_TRUE(natural_less("a9", "a10b"));
  EXPECT_TRUE(natural_less("x.w", "x0"));  // '.' < digit
  EXPECT_FALSE(natural_less("same", "same"));
  // Equal numbers with different leading zeros still order strictly (bytewise fallback).
  EXPECT_NE(natural_less("a01", "a1"), natural_less("a1", "a01"));
  EXPECT_TRUE(natural_less("n99999999999999999999999", "n100000000000000000000000"));
}

TEST_F(Safetensors, ShardedIndexIsPythonFormattedInNaturalOrder) {
  Tensor t = pattern({2}, DType::F32, 0);
  // Greedy split as huggingface_hub does, limit 8 bytes: one tensor per shard.
  write_checkpoint(dir, {{"layers.10.w", t}, {"layers.2.w", t}, {"\xc3\xa9mb", t}}, 8);
  // Python's json.dumps(indent=2, sort_keys=True) + "\n" would list layers.10 first.
  EXPECT_EQ(read_string(dir / "model.safetensors.index.json"),
            "{\n  \"metadata\": {\n    \"total_size\": 24\n  },\n  \"weight_map\": {\n"
            "    \"layers.2.w\": \"model-00002-of-00003.safetensors\",\n"
            "    \"layers.10.w\": \"model-00001-of-00003.safetensors\",\n"
            "    \"\\u00e9mb\": \"model-00003-of-00003.safetensors\"\n  }\n}\n");
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(c.files().size(), 3u);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"layers.2.w", "layers.10.w", "\xc3\xa9mb"}));
  EXPECT_TRUE(same_bytes(c.get("layers.2.w"), t));
}

TEST_F(Safetensors, ShardSplitFollowsHuggingfaceHub) {
  auto t = [](int64_t n) { return pattern({n}, DType::U8, 0); };
  // limit 100: a,b fill shard 1; c would tip it, so it closes; d (oversized) becomes its
  // own shard immediately, ahead of the shard c and e are filling.
  write_checkpoint(dir, {{"a", t(40)}, {"b", t(40)}, {"c", t(40)}, {"d", t(200)}, {"e", t(10)}},
                   100);
  Checkpoint c = Checkpoint::open(dir);
  auto file_of = [&](const std::string& n) {
    for (const auto& f : c.files())
      if (f.contains(n)) return f.path().filename().string();
    return std::string();
  };
  EXPECT_EQ(file_of("a"), "model-00001-of-00003.safetensors");
  EXPECT_EQ(file_of("b"), "model-00001-of-00003.safetensors");
  EXPECT_EQ(file_of("d"), "model-00002-of-00003.safetensors");
  EXPECT_EQ(file_of("c"), "model-00003-of-00003.safetensors");
  EXPECT_EQ(file_of("e"), "model-00003-of-00003.safetensors");
  auto index = nlohmann::json::parse(read_string(dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 330);
}

TEST_F(Safetensors, SingleShardReplacesAnEarlierShardedSave) {
  Tensor t = pattern({4}, DType::F32, 0);
  write_checkpoint(dir, {{"a", t}, {"b", t}}, 16);
  ASSERT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  write_checkpoint(dir, {{"a", t}, {"b", t}}, 1000);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(Checkpoint::open(dir).names(), (std::vector<std::string>{"a", "b"}));
}

// ------------------------------------------------------------------- golden files (Python)

// tests/golden/safetensors/mixed.safetensors rebuilt from the formulas in its README.md.
std::vector<NamedTensor> mixed_tensors() {
  auto make = [](Shape shape, DType dt, auto fill) {
    Tensor t = Tensor::zeros(std::move(shape), dt);
    for (int64_t i = 0; i < t.numel(); ++i) fill(t, i);
    return t;
  };
  std::vector<NamedTensor> v;
  // Given in reverse of the file's order: the writer must do the sorting.
  v.push_back({"empty_f32", Tensor::zeros({0, 3}, DType::F32)});
  v.push_back(
      {"scalar_f32", make({}, DType::F32, [](Tensor& t, int64_t) { t.data<float>()[0] = 3.5f; })});
  v.push_back({"bool", make({7}, DType::BOOL,
                            [](Tensor& t, int64_t i) { t.data<uint8_t>()[i] = i % 3 == 0; })});
  v.push_back({"u8", make({3, 4}, DType::U8,
                          [](Tensor& t, int64_t i) { t.data<uint8_t>()[i] = uint8_t(i * 21); })});
  v.push_back({"i8", make({8}, DType::I8, [](Tensor& t, int64_t i) {
                 t.data<int8_t>()[i] = int8_t(i * 31 - 120);
               })});
  v.push_back({"i32", make({2, 3}, DType::I32, [](Tensor& t, int64_t i) {
                 t.data<int32_t>()[i] = int32_t(i * 100000 - 250000);
               })});
  v.push_back({"i64", make({5}, DType::I64, [](Tensor& t, int64_t i) {
                 t.data<int64_t>()[i] = (i - 2) * (int64_t(1) << 40) + i;
               })});
  v.push_back({"bf16_rounded", make({6}, DType::BF16, [](Tensor& t, int64_t i) {
                 volatile float third = float(i) / 3.0f;  // fp32 steps, as torch does them
                 t.data<uint16_t>()[i] = float_to_bf16(1.0f + third);
               })});
  v.push_back({"bf16", make({4, 2}, DType::BF16, [](Tensor& t, int64_t i) {
                 t.data<uint16_t>()[i] = float_to_bf16(float(i) * 0.5f - 2.0f);
               })});
  v.push_back({"f16", make({2, 2, 3}, DType::F16, [](Tensor& t, int64_t i) {
                 t.data<uint16_t>()[i] = float_to_f16(float(i) * 0.5f - 3.0f);
               })});
  v.push_back({"f32", make({3, 5}, DType::F32, [](Tensor& t, int64_t i) {
                 t.data<float>()[i] = float(i) * 0.25f - 1.0f;
               })});
  v.push_back({"f64", make({2, 3}, DType::F64, [](Tensor& t, int64_t i) {
                 volatile double scaled =
                     double(i) * 0.1;  // no fused multiply-add: numpy rounds twice
                 t.data<double>()[i] = scaled - 0.25;
               })});
  return v;
}

TEST_F(Safetensors, GoldenMixedIsByteIdenticalToPython) {
  fs::path golden = kGolden / "safetensors" / "mixed.safetensors";
  ASSERT_TRUE(fs::exists(golden)) << golden;
  auto want = read_bytes(golden);
  auto tensors = mixed_tensors();
  EXPECT_EQ(serialize_safetensors(tensors), want);
  write_safetensors(dir / "mixed.safetensors", tensors);
  EXPECT_EQ(read_bytes(dir / "mixed.safetensors"), want);

  SafetensorsFile f = SafetensorsFile::open(golden);
  ASSERT_EQ(f.entries().size(), tensors.size());
  EXPECT_EQ(f.entries().front().name, "i64");  // header order, as the README lists it
  for (const auto& t : tensors) EXPECT_TRUE(same_bytes(f.get(t.name), t.tensor)) << t.name;
  const double rounded[] = {1.0, 1.3359375, 1.6640625, 2.0, 2.328125, 2.671875};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(f.get("bf16_rounded").get(i), rounded[i]);
  EXPECT_EQ(f.get("f64").get(5), 5 * 0.1 - 0.25);
  EXPECT_EQ(f.get("i64").data<int64_t>()[0], -(int64_t(2) << 40));
  EXPECT_EQ(f.get("scalar_f32").rank(), 0);
  EXPECT_EQ(f.entry("empty_f32").begin, f.entry("empty_f32").end);
}

TEST_F(Safetensors, GoldenShardedCheckpointMatchesSingleFile) {
  Checkpoint sharded = Checkpoint::open(kGolden / "e4b_sharded");
  Checkpoint single = Checkpoint::open(kGolden / "e4b");
  EXPECT_EQ(sharded.files().size(), 8u);
  ASSERT_EQ(sharded.names(), single.names());
  // The sharded copy was cast to bf16 by torch (round to nearest even) before saving.
  for (const auto& n : single.names()) {
    Tensor a = sharded.get(n), b = single.get(n);
    EXPECT_TRUE(same_bytes(a, b.dtype() == DType::BF16 ? b : b.to(DType::BF16))) << n;
  }
}

TEST_F(Safetensors, RewrittenGoldenCheckpointHasNaturalOrderIndex) {
  Checkpoint single = Checkpoint::open(kGolden / "e4b");
  std::vector<NamedTensor> tensors;
  uint64_t total = 0;
  for (const auto& e : single.files()[0].entries()) {
    tensors.push_back({e.name, single.get(e.name)});
    total += e.end - e.begin;
  }
  write_checkpoint(dir, tensors, 200'000);
  auto index = nlohmann::ordered_json::parse(read_string(dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], total);
  std::vector<std::string> keys;
  std::set<std::string> shards;
  for (const auto& [k, v] : index["weight_map"].items()) {
    keys.push_back(k);
    shards.insert(v.get<std::string>());
  }
  EXPECT_EQ(keys.size(), tensors.size());
  EXPECT_GT(shards.size(), 1u);
  EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end(), natural_less));
  EXPECT_FALSE(std::is_sorted(keys.begin(), keys.end()));  // layers.2 precedes layers.10
  for (const auto& s : shards) EXPECT_TRUE(fs::exists(dir / s)) << s;
  Checkpoint back = Checkpoint::open(dir);
  for (const auto& t : tensors) EXPECT_TRUE(same_bytes(back.get(t.name), t.tensor)) << t.name;
}

}  // namespace
}  // namespace tl
