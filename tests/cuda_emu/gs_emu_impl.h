// The emulator's versions of the prelude's device primitives (see emu.h).
// Included by the generated source at the point where gs_t is defined.
#pragma once

GS_DEV float gs_f(gs_t v)
{
#if GS_STORE == 0
    return v;
#elif GS_STORE == 1
    _Float16 h;
    std::memcpy(&h, &v, 2);
    return (float)h;
#else
    return __uint_as_float(((unsigned)v) << 16);
#endif
}

GS_DEV gs_t gs_s(float f)
{
#if GS_STORE == 0
    return f;
#elif GS_STORE == 1
    const _Float16 h = (_Float16)f;  // round to nearest even
    unsigned short r;
    std::memcpy(&r, &h, 2);
    return r;
#else
    unsigned u = __float_as_uint(f);
    if (std::isnan(f)) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
#endif
}

template <int NW, bool NC>
GS_DEV void gs_ld_words(unsigned* w, const void* p)
{
    const size_t n = 4 * NW;
    if (emu::check(p, n, n < 16 ? n : 16, "load", NC)) std::memcpy(w, p, n);
    else for (int i = 0; i < NW; ++i) w[i] = 0x7fc00000u;  // NaN
}

template <int NW>
GS_DEV void gs_st_words(void* p, const unsigned* w)
{
    const size_t n = 4 * NW;
    if (emu::check(p, n, n < 16 ? n : 16, "store")) std::memcpy(p, w, n);
}

template <bool NC>
GS_DEV gs_t gs_ld1(const gs_t* p)
{
    if (emu::check(p, sizeof(gs_t), sizeof(gs_t), "load", NC)) return *p;
    return gs_s(std::nanf(""));
}

GS_DEV void gs_st1(gs_t* p, gs_t v)
{
    if (emu::check(p, sizeof(gs_t), sizeof(gs_t), "store")) *p = v;
}

template <bool NC>
GS_DEV float gs_ld1f(const float* p)
{
    if (emu::check(p, 4, 4, "load", NC)) return *p;
    return std::nanf("");
}

GS_DEV void gs_st1f(float* p, float v)
{
    if (emu::check(p, 4, 4, "store")) *p = v;
}

template <int NB>
GS_DEV void gs_cp_async(void* d, const void* p, bool valid)
{
    static_assert(NB == 4 || NB == 8 || NB == 16, "cp.async copies 4, 8 or 16 bytes");
    emu::cp_async(d, p, NB, valid);
}
GS_DEV void gs_cp_commit() { emu::cp_commit(); }
template <int N>
GS_DEV void gs_cp_wait() { emu::cp_wait(N); }

template <int NW>
GS_DEV void gs_lds_words(unsigned* w, const void* s)
{
    if (emu::lds_check(s, 4 * NW)) std::memcpy(w, s, 4 * NW);
    else for (int i = 0; i < NW; ++i) w[i] = 0x7fc00000u;  // NaN
}

GS_DEV void gs_atomic_add(float* p, float v)
{
    if (emu::check(p, 4, 4, "atomic add")) *p += v;  // fibers run one at a time: a plain add is atomic
}

GS_DEV float* gs_smem() { return emu::smem_of(emu::g.cur->blk); }
GS_DEV unsigned gs_dyn_smem_bytes() { return (unsigned)emu::g.smem_bytes; }
GS_DEV void gs_trap() { emu::trap(); }
GS_DEV void gs_sync_block() { emu::syncthreads(); }
GS_DEV void gs_sync_cluster() { emu::sync_cluster(); }
GS_DEV void gs_st_peer(float* p, int rank, float v) { emu::st_peer(p, rank, v); }
GS_DEV void gs_sync_warp() { emu::warp_op(emu::OP_SYNC, 0xffffffffu, 0, 0); }
GS_DEV int gs_opaque(int v) { return v; }
GS_DEV float gs_shfl_xor(float v, int m, unsigned lanes = 0xffffffffu)
{
    return __uint_as_float(emu::warp_op(emu::OP_XOR, lanes, m, __float_as_uint(v)));
}
