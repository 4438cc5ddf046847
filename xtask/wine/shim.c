/* bcryptprimitives.dll for wine 8.0, which lacks ProcessPrng (imported by Rust's std on windows-gnu).
   Built by `cargo xtask windows-check` with mingw and placed next to the .exe under test. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length); /* advapi32 RtlGenRandom */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    for (; len > 0x80000000u; data += 0x80000000u, len -= 0x80000000u)
        if (!SystemFunction036(data, 0x80000000u)) return FALSE;
    return SystemFunction036(data, (ULONG)len);
}
