// Query blocks of the CPU sparse attention kernels and their key segments, built from MaskSpec
// once per mask and cached (see sparse_attention_cpu.h).
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "sparse_attention_cpu.h"

namespace dalle_fast {
namespace sparse_cpu {
namespace {

// Query blocks: runs of queries whose allowed keys nearly coincide.
std::vector<QueryBlock> query_blocks(const MaskSpec& ms, int bq) {
  std::vector<QueryBlock> out;
  const int T = ms.text_len, W = ms.image_size;
  auto add = [&](int q0, int len, int stride) { out.push_back({q0, len, stride, 0, 0, 0}); };
  for (int q0 = 0; q0 < T; q0 += bq) add(q0, std::min(bq, T - q0), 1);
  if (ms.kind == MaskKind::Column) {
    for (int c = 0; c < W; ++c)
      for (int r0 = 0; r0 < W; r0 += bq) add(T + r0 * W + c, std::min(bq, W - r0), W);
  } else if (ms.kind == MaskKind::Conv) {
    for (int r = 0; r < W; ++r)
      for (int c0 = 0; c0 < W; c0 += bq) add(T + r * W + c0, std::min(bq, W - c0), 1);
  } else {
    for (int p0 = 0; p0 < W * W; p0 += bq) add(T + p0, std::min(bq, W * W - p0), 1);
  }
  return out;
}

std::shared_ptr<const Layout> build_layout(const MaskSpec& ms, int bq) {
  auto L = std::make_shared<Layout>();
  L->blocks = query_blocks(ms, bq);
  const int N = ms.seq_len();
  std::vector<uint8_t> used(N, 0);
  std::vector<int> keys;
  std::vector<uint8_t> full;
  for (auto& b : L->blocks) {
    const int qlast = b.q0 + (b.len - 1) * b.stride;
    for (int r = 0; r < b.len; ++r) {
      const int i = b.q0 + r * b.stride, cnt = ms.allowed_count(i);
      for (int n = 0; n < cnt; ++n) used[ms.allowed_key(i, n)] = 1;
    }
    keys.clear();
    for (int j = 0; j <= qlast; ++j)
      if (used[j]) keys.push_back(j), used[j] = 0;
    // A key is "full" when every query of the block may attend it: no mask needed there. Short full
    // runs are folded into the masked neighbours: one GEMM call costs more than a few mask bytes.
    const int nk = (int)keys.size();
    full.assign(nk, 1);
    for (int x = 0; x < nk; ++x)
      for (int r = 0; r < b.len && full[x]; ++r) full[x] = ms.allowed(b.q0 + r * b.stride, keys[x]);
    for (int x = 0; x < nk;) {
      int y = x;
      while (y < nk && full[y] == full[x]) ++y;
      if (full[x] && y - x < 16) std::fill(full.begin() + x, full.begin() + y, 0);
      x = y;
    }
    b.seg_begin = (int)L->segs.size();
    for (int x = 0; x < nk;) {
      int stride = 1, y = x + 1;
      if (y < nk && full[y] == full[x]) {
        stride = keys[y] - keys[x];
        while (y < nk && full[y] == full[x] && keys[y] - keys[y - 1] == stride) ++y;
      }
      Segment s{keys[x], y - x, stride, x, -1};
      if (!full[x]) {
        s.mask_off = (int64_t)L->masks.size();
        for (int r = 0; r < b.len; ++r)
          for (int j = 0; j < s.len; ++j)
            L->masks.push_back(ms.allowed(b.q0 + r * b.stride, s.k0 + j * s.stride) ? 1 : 0);
      }
      L->segs.push_back(s);
      x = y;
    }
    b.seg_end = (int)L->segs.size();
    b.ncols = nk;
    L->pairs += (int64_t)nk * b.len;
    L->max_cols = std::max(L->max_cols, nk);
    L->max_rows = std::max(L->max_rows, b.len);
  }
  return L;
}

int block_rows() {
  static const int bq = [] {
    const char* e = std::getenv("DALLE_FAST_SPARSE_BLOCK");  // tuning knob; 64 measured best here
    const int v = e ? std::atoi(e) : 64;
    return v >= 1 && v <= 1024 ? v : 64;
  }();
  return bq;
}

}  // namespace

std::shared_ptr<const Layout> get_layout(const MaskSpec& ms) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int>, std::shared_ptr<const Layout>> cache;
  const int bq = block_rows();
  const auto key = std::make_tuple((int)ms.kind, ms.text_len, ms.image_size, ms.conv_kernel, bq);
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 64) cache.clear();  // tests sweep many shapes; a model uses a handful
  return cache[key] = build_layout(ms, bq);
}

int64_t key_groups(int64_t BH, int64_t nb) {
  const int64_t nth = at::get_num_threads();
  const bool enough_heads = BH >= 4 * nth || (BH >= nth && BH % nth == 0);
  return enough_heads ? 1 : std::min<int64_t>(nb, (4 * nth + BH - 1) / BH);
}

}  // namespace sparse_cpu
}  // namespace dalle_fast
