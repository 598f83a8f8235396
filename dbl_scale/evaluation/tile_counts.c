/* The counting half of the tiled evaluation (dbl_scale/evaluation/counting.py), in one pass over
   a tile of scores (rows x cols, row-major float32) while it is in cache: per row, how many
   scores are above / equal to the row's threshold (an image's best positive); per column, how
   many are above / at least the column's threshold (a caption's positive); and which rows and
   columns hold a NaN. Counts are added to what the arrays hold.

   Rows go in groups of 8, so each column's threshold and counts are read and written once per
   8 rows; the loops are plain C that the compiler vectorises. row_nan == NULL says the caller
   knows there is no NaN (finite embeddings whose products cannot overflow), and the NaN test
   leaves the inner loop. Plain IEEE comparisons: build without -ffast-math, which would drop
   the NaN checks. */
#include <stdint.h>

enum { GROUP = 8 };

/* The NaN flags of rows i0 .. i0+n-1, in a pass of their own (only where a group holds one). */
static void nan_flags(const float *s, int64_t i0, int64_t n, int64_t cols, uint8_t *row_nan, uint8_t *col_nan) {
    for (int64_t i = i0; i < i0 + n; i++)
        for (int64_t j = 0; j < cols; j++)
            if (s[i * cols + j] != s[i * cols + j]) row_nan[i] = col_nan[j] = 1;
}

/* n rows from x (n <= GROUP; with n == GROUP the trip count is fixed, and the compiler unrolls
   it); returns whether one held a NaN when check_nan is set. Inlined with check_nan constant. */
static inline __attribute__((always_inline)) int count_group(
        const float *x, int64_t n, int64_t cols, const float *t, const float *col_t, int32_t *gt, int32_t *eq,
        int32_t *col_gt, int32_t *col_ge, const int check_nan) {
    int nan = 0;
    for (int64_t j = 0; j < cols; j++) {
        const float c = col_t[j];
        int32_t above = 0, at_least = 0;
        for (int64_t r = 0; r < n; r++) {
            const float v = x[r * cols + j];
            gt[r] += v > t[r];
            eq[r] += v == t[r];
            above += v > c;
            at_least += v >= c;
            if (check_nan) nan |= v != v;
        }
        col_gt[j] += above;
        col_ge[j] += at_least;
    }
    return nan;
}

void tile_counts(const float *s, int64_t rows, int64_t cols, const float *row_t, const float *col_t,
                 int64_t *row_gt, int64_t *row_eq, int32_t *col_gt, int32_t *col_ge,
                 uint8_t *row_nan, uint8_t *col_nan) {
    for (int64_t i0 = 0; i0 < rows; i0 += GROUP) {
        const int64_t n = rows - i0 < GROUP ? rows - i0 : GROUP;
        const float *x = s + i0 * cols;
        int32_t gt[GROUP] = {0}, eq[GROUP] = {0};
        int nan;
        if (n == GROUP)
            nan = row_nan ? count_group(x, GROUP, cols, row_t + i0, col_t, gt, eq, col_gt, col_ge, 1)
                          : count_group(x, GROUP, cols, row_t + i0, col_t, gt, eq, col_gt, col_ge, 0);
        else
            nan = count_group(x, n, cols, row_t + i0, col_t, gt, eq, col_gt, col_ge, 1);
        for (int64_t r = 0; r < n; r++) {
            row_gt[i0 + r] += gt[r];
            row_eq[i0 + r] += eq[r];
        }
        if (nan && row_nan) nan_flags(s, i0, n, cols, row_nan, col_nan);
    }
}
