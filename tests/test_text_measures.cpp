// The repetition measures on hand-made token sequences with hand-counted values.
#include <gtest/gtest.h>

#include "core/tensor.h"
#include "train/eval/text_measures.h"

namespace tl {
namespace {

using V = std::vector<int32_t>;

TEST(TextMeasures, SeqRepN) {
  // 1 2 3 1 2 3 1 2 3: seven 3-grams, three distinct → 4/7 repeat.
  const V cycle{1, 2, 3, 1, 2, 3, 1, 2, 3};
  EXPECT_DOUBLE_EQ(repetition_rate(cycle, 3), 1.0 - 3.0 / 7.0);
  // Bigrams of the same: 12 23 31 12 23 31 12 23 → three distinct of eight.
  EXPECT_DOUBLE_EQ(repetition_rate(cycle, 2), 1.0 - 3.0 / 8.0);
  // One token sixteen times: thirteen 4-grams, one distinct.
  EXPECT_DOUBLE_EQ(repetition_rate(V(16, 7), 4), 12.0 / 13.0);
  EXPECT_DOUBLE_EQ(repetition_rate(V{1, 2, 3, 4, 5, 6}, 4), 0.0);
  EXPECT_DOUBLE_EQ(repetition_rate(V{1, 2, 3}, 4), 0.0);
  EXPECT_DOUBLE_EQ(repetition_rate(V{5, 5, 6, 5}, 1), 0.5);
  EXPECT_THROW(repetition_rate(cycle, 0), Error);
}

TEST(TextMeasures, DistinctN) {
  // "a b a b c": bigrams ab ba ab bc → 3 distinct of 4; trigrams aba bab abc → 3 of 3;
  // 4-grams abab babc → 2 of 2.
  const V t{1, 2, 1, 2, 3};
  EXPECT_DOUBLE_EQ(distinct_n(t, 2), 0.75);
  EXPECT_DOUBLE_EQ(distinct_n(t, 3), 1.0);
  EXPECT_DOUBLE_EQ(distinct_n(t, 4), 1.0);
  EXPECT_DOUBLE_EQ(distinct_n(V(10, 4), 2), 1.0 / 9.0);  // one bigram, nine times
  EXPECT_DOUBLE_EQ(distinct_n(V{1}, 2), 1.0);            // no bigrams: nothing repeats
}

TEST(TextMeasures, LongestRepeatedSuffix) {
  EXPECT_EQ(longest_repeated_suffix(V{1, 2, 3, 1, 2, 3}), 3);  // "1 2 3" ends at 3 and at 6
  EXPECT_EQ(longest_repeated_suffix(V{1, 1, 1, 1}), 3);        // overlapping copies
  EXPECT_EQ(longest_repeated_suffix(V{1, 2, 3, 4}), 0);
  EXPECT_EQ(longest_repeated_suffix(V{9, 1, 2, 8, 1, 2}), 2);  // "1 2" again
  EXPECT_EQ(longest_repeated_suffix(V{}), 0);
  // A cycle of period 3 from position 2 in 20 tokens: 20 − 2 − 3 = 15.
  V loop{7, 8};
  for (int i = 0; i < 18; ++i) loop.push_back(int32_t(1 + i % 3));
  EXPECT_EQ(longest_repeated_suffix(loop), 15);
}

TEST(TextMeasures, LoopRule) {
  V loop{7, 8};
  for (int i = 0; i < 18; ++i) loop.push_back(int32_t(1 + i % 3));
  EXPECT_TRUE(loops(loop));  // suffix 15 ≥ 8 and ≥ 20/4
  V varied;
  for (int i = 0; i < 40; ++i) varied.push_back(int32_t(i));
  EXPECT_FALSE(loops(varied));
  // A repeated phrase of 8 in 40 tokens: long enough, but under a quarter → no loop.
  V phrase = varied;
  for (int i = 0; i < 8; ++i) phrase.push_back(int32_t(10 + i));
  EXPECT_EQ(longest_repeated_suffix(phrase), 8);
  EXPECT_FALSE(loops(phrase));
  // "1 … 7" twice after a 9: a repeated suffix of 7, over a quarter of 15 but under
  // kLoopMinTokens → no loop.
  const V short_repeat{9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(longest_repeated_suffix(short_repeat), 7);
  EXPECT_FALSE(loops(short_repeat));
}

TEST(TextMeasures, ScoresAverageAndDropTheStopToken) {
  GenerationScores s;
  s.add(V(12, 5), false);          // loops; rep-4 = 8/9; distinct-2 = 1/11
  s.add(V{1, 2, 3, 4, 99}, true);  // the stop token 99 is not scored: 1 2 3 4
  const GenerationScores m = s.mean();
  EXPECT_EQ(m.count, 2);
  EXPECT_EQ(m.stopped, 1);
  EXPECT_DOUBLE_EQ(m.loop_fraction, 0.5);
  EXPECT_DOUBLE_EQ(m.rep4, (8.0 / 9.0 + 0.0) / 2);
  EXPECT_DOUBLE_EQ(m.distinct2, (1.0 / 11.0 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(m.repeated_suffix, (11.0 + 0.0) / 2);
}

}  // namespace
}  // namespace tl
