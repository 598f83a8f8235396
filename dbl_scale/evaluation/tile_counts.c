/* The counting half of the tiled evaluation (dbl_scale/evaluation/counting.py), in one pass over
   a tile of scores (rows x cols, row-major float32) while it is in cache: per row, how many
   scores are above / equal to the row's threshold (an image's best positive); per column, how
   many are above / at least the column's threshold (a caption's positive); and which rows and
   columns hold a NaN. Counts are added to what the arrays hold. Plain IEEE comparisons: build
   without -ffast-math, which would drop the NaN checks. */
#include <stdint.h>

void tile_counts(const float *s, int64_t rows, int64_t cols, const float *row_t, const float *col_t,
                 int64_t *row_gt, int64_t *row_eq, int32_t *col_gt, int32_t *col_ge,
                 uint8_t *row_nan, uint8_t *col_nan) {
    for (int64_t i = 0; i < rows; i++) {
        const float *x = s + i * cols;
        const float t = row_t[i];
        int32_t gt = 0, eq = 0, nan = 0;
        for (int64_t j = 0; j < cols; j++) {
            const float v = x[j];
            gt += v > t;
            eq += v == t;
            col_gt[j] += v > col_t[j];
            col_ge[j] += v >= col_t[j];
            nan |= v != v;
        }
        row_gt[i] += gt;
        row_eq[i] += eq;
        if (nan) {
            row_nan[i] = 1;
            for (int64_t j = 0; j < cols; j++) col_nan[j] |= x[j] != x[j];
        }
    }
}
