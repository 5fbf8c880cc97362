// DALL-E's attention masks as a predicate and as per-query key ranges, shared by the CPU and CUDA
// kernels (host and device, no ATen). Sequence: text_len text tokens, then an S x S image grid in
// raster order; N = text_len + S*S. See dalle_fast.attention_mask for the dense reference.
#pragma once
#include "dalle_fast/common.h"

namespace dalle_fast {

enum class MaskKind : int { Full = 0, Row = 1, Column = 2, Conv = 3 };

struct MaskSpec {
  MaskKind kind;
  int text_len;     // T
  int image_size;   // S (grid is S x S)
  int conv_kernel;  // k, odd; used by Conv only

  DF_HOST_DEVICE int seq_len() const { return text_len + image_size * image_size; }

  // May query i attend key j?
  DF_HOST_DEVICE bool allowed(int i, int j) const {
    if (j > i) return false;
    if (i < text_len || j < text_len) return true;  // text->text causal; image->text always
    const int W = image_size, p = i - text_len, q = j - text_len;
    switch (kind) {
      case MaskKind::Full: return true;
      case MaskKind::Row: return q >= p - W;
      case MaskKind::Column: return (q % W) == (p % W);
      case MaskKind::Conv: {
        const int h = (conv_kernel - 1) / 2;
        const int r = p / W, c = p % W, rq = q / W, cq = q % W;
        return rq >= r - h && cq >= c - h && cq <= c + h;
      }
    }
    return false;
  }

  // Number of keys query i may attend (for FLOP counts and decode sizing).
  DF_HOST_DEVICE int allowed_count(int i) const {
    if (i < text_len) return i + 1;
    const int W = image_size, p = i - text_len, r = p / W, c = p % W;
    switch (kind) {
      case MaskKind::Full: return i + 1;
      case MaskKind::Row: return text_len + (p < W ? p + 1 : W + 1);
      case MaskKind::Column: return text_len + r + 1;
      case MaskKind::Conv: {
        const int h = (conv_kernel - 1) / 2;
        const int lo = c - h < 0 ? 0 : c - h, hi = c + h >= W ? W - 1 : c + h;
        const int rows_above = r < h ? r : h;
        return text_len + rows_above * (hi - lo + 1) + (c - lo + 1);
      }
    }
    return 0;
  }

  // The i-th allowed key of query i in increasing order (0 <= n < allowed_count(i)): lets a decode
  // step gather exactly the allowed keys without scanning the others.
  DF_HOST_DEVICE int allowed_key(int i, int n) const {
    if (i < text_len || n < text_len) return n;
    const int W = image_size, p = i - text_len, r = p / W, c = p % W, m = n - text_len;
    switch (kind) {
      case MaskKind::Full: return n;
      case MaskKind::Row: return text_len + (p < W ? 0 : p - W) + m;
      case MaskKind::Column: return text_len + m * W + c;
      case MaskKind::Conv: {
        const int h = (conv_kernel - 1) / 2;
        const int lo = c - h < 0 ? 0 : c - h, hi = c + h >= W ? W - 1 : c + h;
        const int width = hi - lo + 1, r0 = r < h ? 0 : r - h;
        const int row = m / width;  // rows r0..r-1 are full width; row r stops at column c
        return text_len + (r0 + row) * W + lo + (m - row * width);
      }
    }
    return n;
  }
};

}  // namespace dalle_fast
