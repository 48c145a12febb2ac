// Training data: jsonl datasets → token ids with loss labels → (packed) rows → micro-batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "train/train_config.h"
#include "train/train_step.h"

namespace tl {

// One training document: ids and labels (−100 where no loss), unshifted (HF convention).
struct Example {
  std::vector<int32_t> ids, labels;
};

struct DataStats {
  int64_t examples = 0, truncated = 0, dropped = 0, tokens = 0, trained_tokens = 0;
};

// Reads every dataset of `cfg`, renders and tokenizes each line by its type, applies the
// overlong policy. Errors name the file and line ("data.jsonl:17: ..."); an empty dataset
// is an error.
std::vector<Example> load_examples(const TrainConfig& cfg, const Tokenizer& tok, DataStats& stats);

// Splits off ceil(val_set_size·n) examples (chosen by a seeded shuffle) for validation.
void split_validation(std::vector<Example>& train, std::vector<Example>& val, double fraction, uint64_t seed);

// A row of the batch: several documents packed back to back (or one, unpacked).
struct Row {
  std::vector<int32_t> ids, labels, positions, doc_ids;
};

// Greedy packing in order into rows of at most `sequence_len` tokens; positions restart and
// doc ids change at each document, and the first label of each document is −100 so no
// target crosses a boundary. With packing off, one document per row.
std::vector<Row> make_rows(const std::vector<Example>& examples, int64_t sequence_len, bool packing);

// Rows [begin, begin+count) of `order` as one micro-batch, right-padded with <pad> (id 0,
// label −100, its own doc id) to the longest row.
MicroBatch make_micro_batch(const std::vector<Row>& rows, const std::vector<int64_t>& order, int64_t begin,
                            int64_t count);

// The order rows are visited in during `epoch`: a seeded Fisher–Yates shuffle.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace tl
