// Host shims for the real CUDA prelude (templates/cuda/prelude.cuh.j2 without GSPN_EMULATE): CUDA's
// vector types, intrinsics and qualifiers defined away, and the PTX instructions its inline asm uses
// implemented per the PTX ISA (tests/cuda_emu/prelude.py rewrites each asm statement into a call).
// The emulator replaces the prelude's primitives; this runs them. Tests only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__

struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
template <class T>
inline T __ldg(const T* p)
{
    return *p;
}
inline float __uint_as_float(unsigned u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f)
{
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline void __trap() { std::abort(); }
inline void __syncthreads() {}
inline void __syncwarp() {}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline float atomicAdd(float* p, float v)
{
    const float old = *p;
    *p += v;
    return old;
}
// cp.async (the ring's copies): at once on the host, where nothing else runs meanwhile
template <int NB>
inline void gs_cp_async(void* d, const void* p, bool valid)
{
    static_assert(NB == 4 || NB == 8 || NB == 16, "cp.async copies 4, 8 or 16 bytes");
    if (valid) std::memcpy(d, p, NB);
    else std::memset(d, 0, NB);
}
inline void gs_cp_commit() {}
template <int N>
inline void gs_cp_wait() {}

namespace gs_ptx {

enum Mode { RN, RZ, RM, RP };

// fp32 -> a binary format with E exponent and M mantissa bits, rounded as `mode` (cvt.{rn,rz,rm,rp});
// subnormals kept (no .ftz); NaN -> the canonical NaN, as cvt gives.
inline unsigned narrow(float f, int E, int M, Mode mode)
{
    const unsigned sign = __float_as_uint(f) >> 31, s = sign << (E + M);
    const unsigned inf = ((1u << E) - 1u) << M, maxf = inf - 1u;
    if (std::isnan(f)) return inf | ((1u << M) - 1u);  // 0x7fff for both fp16 and bf16
    if (std::isinf(f)) return s | inf;
    const double a = std::fabs((double)f);
    if (a == 0.0) return s;
    const int bias = (1 << (E - 1)) - 1, emin = 1 - bias;
    int e;
    std::frexp(a, &e);
    const int q = (e - 1 > emin ? e - 1 : emin) - M;  // spacing of representable values near a: 2^q
    const double sc = std::ldexp(a, -q), fl = std::floor(sc), frac = sc - fl;
    double r = fl;
    if (mode == RN) r = frac > 0.5 || (frac == 0.5 && std::fmod(fl, 2.0) != 0.0) ? fl + 1 : fl;
    if ((mode == RP && !sign) || (mode == RM && sign)) r = frac > 0 ? fl + 1 : fl;  // away from zero
    const double mag = std::ldexp(r, q);
    if (mag >= std::ldexp(1.0, bias + 1)) {  // overflow: infinity unless rounding toward zero
        const bool to_inf = mode == RN || (mode == RP && !sign) || (mode == RM && sign);
        return s | (to_inf ? inf : maxf);
    }
    if (mag == 0.0) return s;  // rounded to zero
    std::frexp(mag, &e);
    if (e - 1 < emin) return s | (unsigned)std::ldexp(mag, M - emin);  // subnormal
    return s | ((unsigned)(e - 1 + bias) << M) | ((unsigned)std::ldexp(mag, M - (e - 1)) - (1u << M));
}

inline float widen(unsigned v, int E, int M)  // exact
{
    const unsigned sign = (v >> (E + M)) & 1u, ex = (v >> M) & ((1u << E) - 1u), man = v & ((1u << M) - 1u);
    const int bias = (1 << (E - 1)) - 1;
    float r;
    if (ex == (1u << E) - 1u) r = man ? NAN : INFINITY;
    else if (ex == 0) r = (float)std::ldexp((double)man, 1 - bias - M);
    else r = (float)std::ldexp((double)(man | (1u << M)), (int)ex - bias - M);
    return sign ? -r : r;
}

inline float cvt_f32_f16(unsigned short h) { return widen(h, 5, 10); }
inline float cvt_f32_bf16(unsigned short h) { return widen(h, 8, 7); }
#define GS_PTX_NARROW(rm, MODE)                                                                      \
    inline unsigned short cvt_##rm##_f16_f32(float f) { return (unsigned short)narrow(f, 5, 10, MODE); } \
    inline unsigned short cvt_##rm##_bf16_f32(float f) { return (unsigned short)narrow(f, 8, 7, MODE); }
GS_PTX_NARROW(rn, RN)
GS_PTX_NARROW(rz, RZ)
GS_PTX_NARROW(rm, RM)
GS_PTX_NARROW(rp, RP)
#undef GS_PTX_NARROW
inline int mov_b32(int v) { return v; }  // a 32-bit copy (gs_opaque: hides a value from the compiler)

}  // namespace gs_ptx
