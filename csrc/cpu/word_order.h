// Where the words of a packed plane lie in memory on the CPU (docs/FORMAT.md, "CPU word order").
//
// Format v1 stores a plane of `rows` word rows as [rows, N], N contiguous: word (r, n) at r N + n. A kernel that
// walks one panel of 64 inputs (a few word rows) across its columns then reads that many runs N words apart at
// once, and one core streams such a walk from DRAM 1.3-1.6x slower than one straight run of the same bytes
// (docs/NOTES.md). The CPU word order keeps each band of `band` word rows (64 inputs) together, 16 columns at a
// time: word (r, n) at b0 N + n0 h + (r - b0) w + (n - n0), with b0 = band floor(r / band), h = min(band,
// rows - b0) the band's rows, n0 = 16 floor(n / 16), w = min(16, N - n0) the strip's columns. A tile of whole
// strips then reads a band as one run. band = 1 is format v1 itself, so every kernel takes both. 3-bit codes are
// also re-packed in the CPU word order (the layout below), so that a kernel tells the two by the band alone.
#pragma once

#include <stdint.h>

#include <algorithm>

namespace saliq {

struct PlaneOrder {
  int64_t N = 0, rows = 0, band = 1;  // band: word rows per band, a power of two (1: format v1)

  // First row b0 and rows h of row r's band; rows past the plane (prefetches) get h = 1.
  int64_t band_start(int64_t r) const { return r & ~(band - 1); }
  int64_t band_rows(int64_t b0) const { return std::max<int64_t>(1, std::min(band, rows - b0)); }

  // Index of word (r, n), any r < rows, n < N.
  int64_t index(int64_t r, int64_t n) const {
    if (band == 1) return r * N + n;
    const int64_t b0 = band_start(r), h = band_rows(b0), n0 = n & ~int64_t{15};
    return b0 * N + n0 * h + (r - b0) * std::min<int64_t>(16, N - n0) + (n - n0);
  }

  // Word row r as seen by a kernel whose columns lie in whole strips (n0 + 16 <= N): word (r, n) at
  // base + (n & ~15) * h + (n & 15). In format v1 base = r N and h = 1. Rows past the plane (prefetches) give an
  // address near its end, never read.
  struct Row {
    const int32_t* base;
    int64_t h;
    const int32_t* at(int64_t n) const { return base + (n & ~int64_t{15}) * h + (n & 15); }
  };
  Row row(const int32_t* plane, int64_t r) const {
    const int64_t b0 = band_start(r);
    return {plane + b0 * N + (r - b0) * 16, band_rows(b0)};
  }

  // For prefetching: a tile of `words` columns from column n (whole strips) reads the h rows of row r's band as
  // one run of h * words words; this is its (r - b0)-th piece of `words` words (format v1: row r's own words).
  const int32_t* tile_piece(const int32_t* plane, int64_t r, int64_t n, int64_t words) const {
    const int64_t b0 = band_start(r);
    return plane + b0 * N + n * band_rows(b0) + (r - b0) * words;
  }

  // A tile's words over a run of rows (the rest of one band; format v1: any rows), for kernels that load a few
  // vectors per row: word (r + dr, n + c) at first + dr * row_step + (c / 16) * strip_step + c % 16, with n a
  // multiple of 16 and c a constant, so that each load is one address mode (format v1: row_step N, strip_step 16;
  // the CPU order: 16 and 16 h).
  struct Tile {
    const int32_t* first;
    int64_t row_step, strip_step;
    const int32_t* at(int64_t dr, int c) const { return first + dr * row_step + (c >> 4) * strip_step + (c & 15); }
  };
  Tile tile(const int32_t* plane, int64_t r, int64_t n) const {
    const Row w = row(plane, r);
    return {w.at(n), band == 1 ? N : 16, 16 * w.h};
  }
  // The end of the run of rows from r that one Tile covers, at most `limit`.
  int64_t run_end(int64_t r, int64_t limit) const {
    return band == 1 ? limit : std::min(limit, (r | (band - 1)) + 1);
  }
  // For prefetching along a block: a block of `cols` columns from n_first (whole strips) reads band after band,
  // each band's words of the block as one run of cols * h words. The address `ahead` words past the start of the
  // piece tile_piece(r, n, words), carried on into the next band's run (CPU word order only).
  const int32_t* ahead_in_block(const int32_t* plane, int64_t r, int64_t n, int64_t words, int64_t n_first,
                                int64_t cols, int64_t ahead) const {
    const int64_t b0 = band_start(r), h = band_rows(b0);
    const int64_t run = cols * h, pos = (n - n_first) * h + (r - b0) * words + ahead;
    if (pos < run) return plane + b0 * N + n_first * h + pos;
    const int64_t b1 = b0 + band;
    return plane + b1 * N + n_first * band_rows(b1) + (pos - run);
  }
};

// Word rows per band of a plane `width` bits a code wide: the rows of 64 inputs (2-bit codes 4, 4-bit 8, the
// 3-bit hi plane 2); in_features that are not a multiple of 64 leave a shorter last band.
constexpr int64_t cpu_order_band(int width) { return 64 / (32 / width); }

// 3-bit codes in the CPU word order (docs/FORMAT.md, "3-bit codes in the CPU word order"): per word row of 16
// inputs, byte b of a column's low word w holds codes 4b and 4b + 1 whole and the low bits of code 4b + 3, nibble b
// of the row's 16 hi bits h (bits 16 (r & 1) .. of hi word r / 2) code 4b + 2 whole and the third bit of 4b + 3:
//   w byte b = c0 | c1 << 3 | (c3 & 3) << 6,   h nibble b = c2 | (c3 >> 2) << 3   (c_j: the code of input 4b + j)
// so an integer kernel takes each code with one or two operations (format v1 joins 2 + 1 bits for every code).

// 16 bits -> nibble b in the low half of byte b, and back (the high halves zero). T: uint32_t, or a GCC vector of
// uint32_t for a kernel's lanes (the same operators and constants).
// (A kernel compiled for AVX-512 instantiates them on 64-byte vectors and inlines them: the build passes -Wno-psabi,
// build_ext_config.py says why.)
template <class T>
inline T spread_nibbles(T h) {
  h &= 0xFFFFu;
  h = (h | (h << 8)) & 0x00FF00FFu;
  return (h | (h << 4)) & 0x0F0F0F0Fu;
}
template <class T>
inline T gather_nibbles(T t) {
  t = (t | (t >> 4)) & 0x00FF00FFu;
  return (t | (t >> 8)) & 0xFFFFu;
}

// One word row of 3-bit codes, format v1's bits <-> the CPU word order's: the low word and the row's 16 hi bits.
// Bits 6-7 of each byte and bit 3 of each nibble stay put.
template <class T>
inline void cpu3_from_v1(T w, T h, T* w_out, T* h_out) {
  const T s = spread_nibbles(h);
  *w_out = (w & 0xC3C3C3C3u) | ((w & 0x0C0C0C0Cu) << 1) | ((s & 0x01010101u) << 2) | ((s & 0x02020202u) << 4);
  *h_out = (h & 0xCCCCu) | gather_nibbles((w >> 4) & 0x03030303u);
}
template <class T>
inline void cpu3_to_v1(T w, T h, T* w_out, T* h_out) {
  const T s = spread_nibbles(h);
  *w_out = (w & 0xC3C3C3C3u) | ((w >> 1) & 0x0C0C0C0Cu) | ((s & 0x03030303u) << 4);
  *h_out = (h & 0xCCCCu) | gather_nibbles(((w >> 2) & 0x01010101u) | ((w >> 4) & 0x02020202u));
}

}  // namespace saliq
