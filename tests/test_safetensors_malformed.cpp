// Malformed safetensors files and checkpoint directories: each must fail with a one-line
// tl::Error naming the file and the fault (never a crash).
#include <gtest/gtest.h>

#include "core/safetensors.h"
#include "tests/safetensors_test_util.h"

namespace tl {
namespace {

using st_test::expect_error;
using st_test::raw_file;
using st_test::write_bytes;

class Malformed : public st_test::ScratchDir {
 protected:
  // Writes `bytes` to bad.safetensors and expects open() to fail naming it and the fault.
  void expect_bad(const std::vector<uint8_t>& bytes, std::vector<std::string> parts) {
    fs::path p = dir / "bad.safetensors";
    write_bytes(p, bytes);
    parts.insert(parts.begin(), p.string());
    expect_error([&] { SafetensorsFile::open(p); }, parts);
  }
  void expect_bad(const std::string& header, size_t data, std::vector<std::string> parts) {
    expect_bad(raw_file(header, data), std::move(parts));
  }
};

// A valid two-tensor header (24 + 8 data bytes) used as a base for broken variants.
const std::string kAB = R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                        R"("b":{"dtype":"I64","shape":[],"data_offsets":[24,32]}})";

TEST_F(Malformed, BaseCaseIsValid) {
  write_bytes(dir / "ok.safetensors", raw_file(kAB, 32));
  EXPECT_EQ(SafetensorsFile::open(dir / "ok.safetensors").entries().size(), 2u);
}

TEST_F(Malformed, EmptyAndShorterThanEightBytes) {
  expect_bad(std::vector<uint8_t>{}, {"0 bytes", "too short"});
  expect_bad(std::vector<uint8_t>{1, 2, 3, 4, 5}, {"5 bytes", "too short"});
  auto f = std::make_shared<const std::vector<uint8_t>>(3, uint8_t(0));
  expect_error([&] { SafetensorsFile::parse(f, "mem.st"); }, {"mem.st", "too short"});
}

TEST_F(Malformed, HeaderLengthPastTheEnd) {
  std::vector<uint8_t> b = raw_file(std::string(112, ' '), 0);
  b[0] = 0x9f;  // 99999 = 0x1869f
  b[1] = 0x86;
  b[2] = 0x01;
  expect_bad(b, {"header length 99999 runs past the end of the file (size 120)"});
}

TEST_F(Malformed, TruncatedInsideTheHeader) {
  auto b = raw_file(kAB, 32);
  b.resize(40);
  expect_bad(b, {"header length", "runs past the end of the file (size 40)"});
}

TEST_F(Malformed, HeaderLengthOverTheLimit) {
  std::vector<uint8_t> b(16, ' ');
  uint64_t n = 100'000'001;
  for (int i = 0; i < 8; ++i) b[i] = uint8_t(n >> (8 * i));
  expect_bad(b, {"header length 100000001 exceeds the limit"});
  for (int i = 0; i < 8; ++i) b[i] = 0xff;  // 2^64-1: no overflow in 8 + N
  expect_bad(b, {"exceeds the limit"});
}

TEST_F(Malformed, DataShorterThanTheOffsets) {
  expect_bad(
      kAB, 31,
      {"data buffer is shorter than the offsets", "\"b\"", "ends at data byte 32", "holds 31"});
}

TEST_F(Malformed, TrailingBytes) { expect_bad(kAB, 33, {"1 trailing bytes"}); }

TEST_F(Malformed, HeaderNotJson) {
  expect_bad("{not json}", 0, {"header is not valid JSON"});
  expect_bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", 4, {"not valid JSON"});
  expect_bad("{\"a\xff\":1}", 0, {"not valid JSON"});  // invalid UTF-8
  expect_bad("", 0, {"not a JSON object"});
}

TEST_F(Malformed, DeepNestingIsRefused) {
  std::string deep = "{\"w\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  expect_bad(deep, 0, {"nests deeper than 128 levels"});
}

TEST_F(Malformed, HeaderNotAnObject) {
  expect_bad("[1,2,3]", 0, {"header is not a JSON object"});
  expect_bad(" {}", 0, {"not a JSON object"});  // must start with '{'
}

TEST_F(Malformed, BadMetadata) {
  expect_bad(R"({"__metadata__":{"format":1}})", 0,
             {"__metadata__ value for key \"format\" is not a string"});
  expect_bad(R"({"__metadata__":["pt"]})", 0, {"__metadata__ is not a map of strings"});
}

TEST_F(Malformed, UnknownDtype) {
  expect_bad(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2,
             {"tensor \"w\"", "unknown or unsupported dtype \"F8_E4M3\""});
  expect_bad(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,2]}})", 2,
             {"tensor \"w\"", "dtype is not a string"});
}

TEST_F(Malformed, BadShape) {
  const char* bad[] = {"[-1]", "[2.0]", "[\"2\"]", "3", "[[2]]", "[1e3]", "[18446744073709551616]"};
  for (const char* s : bad)
    expect_bad(std::string(R"({"w":{"dtype":"U8","shape":)") + s + R"(,"data_offsets":[0,0]}})", 0,
               {"tensor \"w\"", "shape"});
}

TEST_F(Malformed, MissingFieldsAndBadOffsets) {
  expect_bad(R"({"w":{"dtype":"U8","shape":[1]}})", 1, {"tensor \"w\"", "data_offsets"});
  expect_bad(R"({"w":[1]})", 1, {"tensor \"w\"", "not an object"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1, {"[begin, end]"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,-1]}})", 1, {"[begin, end]"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}})", 2, {"end before"});
}

TEST_F(Malformed, SizeDoesNotMatchShapeTimesDtype) {
  expect_bad(
      R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20,
      {"tensor \"w\"", "shape [2, 3] of F32 needs 24 bytes", "data_offsets [0, 20] span 20"});
}

TEST_F(Malformed, HugeShapesOverflowWithoutCrashing) {
  expect_bad(R"({"w":{"dtype":"U8","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}})", 0,
             {"tensor \"w\"", "overflows the element count"});
  expect_bad(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0,
             {"tensor \"w\"", "overflows the byte count"});
  // Zero anywhere after a representable prefix is a valid empty tensor, as in Rust.
  write_bytes(
      dir / "z.safetensors",
      raw_file(R"({"w":{"dtype":"F32","shape":[9223372036854775807,0],"data_offsets":[0,0]}})", 0));
  EXPECT_EQ(SafetensorsFile::open(dir / "z.safetensors").get("w").numel(), 0);
}

TEST_F(Malformed, OverlappingOffsets) {
  expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
             12, {"tensors \"a\" [0, 8) and \"b\" [4, 12) overlap"});
}

TEST_F(Malformed, GapInTheBuffer) {
  expect_bad(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
      20,
      {"gap in the data buffer between tensor \"a\" (ends at 8) and tensor \"b\" (begins at 12)"});
  expect_bad(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12,
             {"gap in the data buffer: bytes [0, 4) before tensor \"b\""});
}

TEST_F(Malformed, DuplicateKeys) {
  expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
             16, {"duplicate key \"a\""});
  expect_bad(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8,
             {"duplicate key \"dtype\""});
}

TEST_F(Malformed, HostileNamesStayOnOneLine) {
  expect_bad("{\"line\\nbreak\":{\"dtype\":\"Q\",\"shape\":[],\"data_offsets\":[0,1]}}", 1,
             {"\"line\\nbreak\""});
}

TEST_F(Malformed, NotAFile) {
  expect_error([&] { SafetensorsFile::open(dir / "absent.safetensors"); },
               {"absent.safetensors", "No such file or directory"});
  expect_error([&] { SafetensorsFile::open(dir); }, {dir.string(), "not a regular file"});
}

// ------------------------------------------------------------------- checkpoint directories

TEST_F(Malformed, DirectoryWithoutWeights) {
  expect_error([&] { Checkpoint::open(dir); },
               {dir.string(), "no model.safetensors or model.safetensors.index.json"});
  expect_error([&] { Checkpoint::open(dir / "absent"); },
               {"absent", "no such checkpoint directory"});
  write_file_atomic(dir / "file", "x");
  expect_error([&] { Checkpoint::open(dir / "file"); }, {"file", "not a directory"});
}

TEST_F(Malformed, IndexNamesAMissingShard) {
  write_checkpoint(
      dir, {{"x", Tensor::zeros({4}, DType::F32)}, {"y", Tensor::zeros({4}, DType::F32)}}, 16);
  fs::remove(dir / "model-00002-of-00002.safetensors");
  expect_error([&] { Checkpoint::open(dir); },
               {"model.safetensors.index.json", "shard \"model-00002-of-00002.safetensors\"",
                "holding tensor \"y\"", "does not exist"});
}

TEST_F(Malformed, IndexNamesATensorItsShardLacks) {
  write_checkpoint(dir, {{"x", Tensor::zeros({4}, DType::F32)}}, 100);
  std::string idx =
      R"({"metadata":{},"weight_map":{"x":"model.safetensors","ghost":"model.safetensors"}})";
  write_file_atomic(dir / "model.safetensors.index.json", idx);
  expect_error([&] { Checkpoint::open(dir); },
               {"model.safetensors.index.json", "tensor \"ghost\"", "does not contain it"});
}

TEST_F(Malformed, IndexNotJsonOrWithoutWeightMap) {
  write_file_atomic(dir / "model.safetensors.index.json", "{\"weight_map\": ");
  expect_error([&] { Checkpoint::open(dir); }, {"model.safetensors.index.json", "not valid JSON"});
  write_file_atomic(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_error([&] { Checkpoint::open(dir); }, {"model.safetensors.index.json", "weight_map"});
  write_file_atomic(dir / "model.safetensors.index.json",
                    R"({"weight_map":{"x":"../m.safetensors"}})");
  expect_error([&] { Checkpoint::open(dir); }, {"not a plain file name"});
}

}  // namespace
}  // namespace tl
