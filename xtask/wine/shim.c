/* bcryptprimitives.dll shim: wine 8.0 lacks ProcessPrng, which Rust's std (windows-gnu) imports. */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length); /* advapi32's RtlGenRandom */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    for (; len > 0x40000000u; data += 0x40000000u, len -= 0x40000000u)
        if (!SystemFunction036(data, 0x40000000u)) return FALSE;
    return SystemFunction036(data, (ULONG)len);
}
