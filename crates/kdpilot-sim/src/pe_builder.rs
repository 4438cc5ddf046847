//! A small PE32/PE32+ writer: the simulator's built-in kernel images (when no real image files
//! are given) and the loader's tests. It writes what a linker would (headers, section table,
//! export directory, import descriptors with their IAT, base relocations), laid out from the
//! PE format itself, not from the loader's reading of it.

use kdpilot_kd::Arch;

/// IMAGE_SCN_CNT_CODE | MEM_EXECUTE | MEM_READ.
pub const SCN_CODE: u32 = 0x6000_0020;
/// IMAGE_SCN_CNT_INITIALIZED_DATA | MEM_READ | MEM_WRITE.
pub const SCN_DATA: u32 = 0xC000_0040;
/// IMAGE_SCN_CNT_INITIALIZED_DATA | MEM_READ.
pub const SCN_RDATA: u32 = 0x4000_0040;
/// .reloc: IMAGE_SCN_CNT_INITIALIZED_DATA | MEM_DISCARDABLE | MEM_READ.
const SCN_RELOC: u32 = 0x4200_0040;

const FILE_ALIGN: u32 = 0x200;
const SECTION_ALIGN: u32 = 0x1000;

#[derive(Clone, Debug)]
struct SectionSpec {
    name: String,
    rva: u32,
    data: Vec<u8>,
    virtual_size: u32,
    characteristics: u32,
}

/// Builds a PE image file.
#[derive(Clone, Debug)]
pub struct PeBuilder {
    arch: Arch,
    name: String,
    image_base: u64,
    entry: u32,
    time_date_stamp: u32,
    sections: Vec<SectionSpec>,
    exports: Vec<(String, u32)>,
    imports: Vec<(String, Vec<String>)>,
    relocs: Vec<u32>,
    next_rva: u32,
}

/// Where the builder put things.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuiltPe {
    /// The file.
    pub file: Vec<u8>,
    /// IAT slot RVA of every import, in the order given: (dll, function, slot RVA).
    pub iat: Vec<(String, String, u32)>,
    /// SizeOfImage.
    pub size_of_image: u32,
}

fn align(v: u32, a: u32) -> u32 {
    v.div_ceil(a) * a
}

fn put(buf: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if buf.len() < at + bytes.len() {
        buf.resize(at + bytes.len(), 0);
    }
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

impl PeBuilder {
    /// A new image named `name` (the export directory's DLL name) preferring `image_base`.
    pub fn new(arch: Arch, name: &str, image_base: u64) -> Self {
        Self {
            arch,
            name: name.to_string(),
            image_base,
            entry: 0,
            time_date_stamp: 0x5E7A_0000,
            sections: Vec::new(),
            exports: Vec::new(),
            imports: Vec::new(),
            relocs: Vec::new(),
            next_rva: SECTION_ALIGN,
        }
    }

    /// The preferred base.
    pub fn image_base(&self) -> u64 {
        self.image_base
    }

    /// Adds a section at the next free page; returns its RVA. `virtual_size` may exceed the
    /// data (the rest is zero-filled when mapped).
    pub fn section(
        &mut self,
        name: &str,
        data: Vec<u8>,
        virtual_size: u32,
        characteristics: u32,
    ) -> u32 {
        let rva = self.next_rva;
        let vsize = virtual_size.max(data.len() as u32).max(1);
        self.next_rva = align(rva + vsize, SECTION_ALIGN);
        self.sections.push(SectionSpec {
            name: name.to_string(),
            rva,
            data,
            virtual_size: vsize,
            characteristics,
        });
        rva
    }

    /// Adds a section at `rva` (page aligned, above every section so far); returns `rva`.
    pub fn section_at(
        &mut self,
        name: &str,
        rva: u32,
        data: Vec<u8>,
        virtual_size: u32,
        characteristics: u32,
    ) -> u32 {
        self.next_rva = align(rva.max(self.next_rva), SECTION_ALIGN);
        self.section(name, data, virtual_size, characteristics)
    }

    /// Exports `name` at `rva`.
    pub fn export(&mut self, name: &str, rva: u32) -> &mut Self {
        self.exports.push((name.to_string(), rva));
        self
    }

    /// Imports `function` from `dll`.
    pub fn import(&mut self, dll: &str, function: &str) -> &mut Self {
        match self
            .imports
            .iter_mut()
            .find(|(d, _)| d.eq_ignore_ascii_case(dll))
        {
            Some((_, f)) => f.push(function.to_string()),
            None => self
                .imports
                .push((dll.to_string(), vec![function.to_string()])),
        }
        self
    }

    /// Marks a pointer-sized absolute address at `rva` (a base relocation).
    pub fn relocation(&mut self, rva: u32) -> &mut Self {
        self.relocs.push(rva);
        self
    }

    /// Sets AddressOfEntryPoint.
    pub fn entry(&mut self, rva: u32) -> &mut Self {
        self.entry = rva;
        self
    }

    fn ptr(&self) -> usize {
        self.arch.pointer_size()
    }

    fn export_section(&self, rva: u32) -> Vec<u8> {
        let mut ex = self.exports.clone();
        ex.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let n = ex.len() as u32;
        let eat = 40;
        let enpt = eat + 4 * n;
        let eot = enpt + 4 * n;
        let mut strings = eot + 2 * n;
        let mut out = Vec::new();
        let dll_name = strings;
        put(&mut out, strings as usize, self.name.as_bytes());
        strings += self.name.len() as u32 + 1;
        put(&mut out, 12, &(rva + dll_name).to_le_bytes()); // Name
        put(&mut out, 16, &1u32.to_le_bytes()); // Base
        put(&mut out, 20, &n.to_le_bytes()); // NumberOfFunctions
        put(&mut out, 24, &n.to_le_bytes()); // NumberOfNames
        put(&mut out, 28, &(rva + eat).to_le_bytes());
        put(&mut out, 32, &(rva + enpt).to_le_bytes());
        put(&mut out, 36, &(rva + eot).to_le_bytes());
        for (i, (name, target)) in ex.iter().enumerate() {
            let i = i as u32;
            put(&mut out, (eat + 4 * i) as usize, &target.to_le_bytes());
            put(
                &mut out,
                (enpt + 4 * i) as usize,
                &(rva + strings).to_le_bytes(),
            );
            put(&mut out, (eot + 2 * i) as usize, &(i as u16).to_le_bytes());
            put(&mut out, strings as usize, name.as_bytes());
            strings += name.len() as u32 + 1;
        }
        out.resize(strings as usize, 0);
        out
    }

    /// The .idata section and the IAT slots.
    fn import_section(&self, rva: u32) -> (Vec<u8>, Vec<(String, String, u32)>) {
        let p = self.ptr() as u32;
        let mut out = Vec::new();
        let mut slots = Vec::new();
        let mut at = 20 * (self.imports.len() as u32 + 1);
        for (i, (dll, funcs)) in self.imports.iter().enumerate() {
            let n = funcs.len() as u32 + 1;
            let ilt = at;
            let iat = ilt + p * n;
            at = iat + p * n;
            let d = 20 * i;
            put(&mut out, d, &(rva + ilt).to_le_bytes()); // OriginalFirstThunk
            put(&mut out, d + 16, &(rva + iat).to_le_bytes()); // FirstThunk
            for (j, f) in funcs.iter().enumerate() {
                let hint_name = at;
                put(&mut out, hint_name as usize + 2, f.as_bytes());
                at = align(hint_name + 2 + f.len() as u32 + 1, 2);
                let thunk = u64::from(rva + hint_name);
                for table in [ilt, iat] {
                    let slot = (table + p * j as u32) as usize;
                    match self.arch {
                        Arch::Amd64 => put(&mut out, slot, &thunk.to_le_bytes()),
                        Arch::X86 => put(&mut out, slot, &(thunk as u32).to_le_bytes()),
                    }
                }
                slots.push((dll.clone(), f.clone(), rva + iat + p * j as u32));
            }
            put(&mut out, at as usize, dll.as_bytes());
            put(&mut out, d + 12, &(rva + at).to_le_bytes()); // Name
            at += dll.len() as u32 + 1;
        }
        out.resize(at as usize, 0);
        (out, slots)
    }

    fn reloc_section(&self) -> Vec<u8> {
        let kind: u16 = match self.arch {
            Arch::Amd64 => 10, // IMAGE_REL_BASED_DIR64
            Arch::X86 => 3,    // IMAGE_REL_BASED_HIGHLOW
        };
        let mut relocs = self.relocs.clone();
        relocs.sort_unstable();
        let mut out = Vec::new();
        let mut i = 0;
        while i < relocs.len() {
            let page = relocs[i] & !0xFFF;
            let mut entries: Vec<u16> = Vec::new();
            while i < relocs.len() && relocs[i] & !0xFFF == page {
                entries.push((kind << 12) | (relocs[i] & 0xFFF) as u16);
                i += 1;
            }
            if entries.len() % 2 == 1 {
                entries.push(0); // IMAGE_REL_BASED_ABSOLUTE padding
            }
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&(8 + 2 * entries.len() as u32).to_le_bytes());
            for e in entries {
                out.extend_from_slice(&e.to_le_bytes());
            }
        }
        out
    }

    /// Writes the file.
    pub fn build(&self) -> BuiltPe {
        let mut b = self.clone();
        let mut dirs = [(0u32, 0u32); 16];
        let mut iat = Vec::new();
        if !b.exports.is_empty() {
            let rva = b.next_rva;
            let data = b.export_section(rva);
            let len = data.len() as u32;
            b.section(".edata", data, 0, SCN_RDATA);
            dirs[0] = (rva, len);
        }
        if !b.imports.is_empty() {
            let rva = b.next_rva;
            let (data, slots) = b.import_section(rva);
            dirs[1] = (rva, 20 * (b.imports.len() as u32 + 1));
            iat = slots;
            b.section(".idata", data, 0, SCN_DATA);
        }
        if !b.relocs.is_empty() {
            let data = b.reloc_section();
            let len = data.len() as u32;
            let rva = b.section(".reloc", data, 0, SCN_RELOC);
            dirs[5] = (rva, len);
        }
        let pe64 = b.arch == Arch::Amd64;
        let opt_size: u32 = if pe64 { 240 } else { 224 };
        let nt = 0x80u32;
        let sec_table = nt + 4 + 20 + opt_size;
        let headers = align(sec_table + 40 * b.sections.len() as u32, FILE_ALIGN);
        let size_of_image = align(b.next_rva, SECTION_ALIGN);
        let mut f = vec![0u8; headers as usize];
        put(&mut f, 0, b"MZ");
        put(&mut f, 0x3C, &nt.to_le_bytes());
        put(&mut f, nt as usize, b"PE\0\0");
        let fh = nt as usize + 4;
        put(&mut f, fh, &b.arch.machine_type().to_le_bytes());
        put(&mut f, fh + 2, &(b.sections.len() as u16).to_le_bytes());
        put(&mut f, fh + 4, &b.time_date_stamp.to_le_bytes());
        put(&mut f, fh + 16, &(opt_size as u16).to_le_bytes());
        let mut characteristics: u16 = if pe64 { 0x0022 } else { 0x0102 };
        if b.name.to_ascii_lowercase().ends_with(".dll") {
            characteristics |= 0x2000;
        }
        put(&mut f, fh + 18, &characteristics.to_le_bytes());
        let oh = fh + 20;
        put(
            &mut f,
            oh,
            &(if pe64 { 0x20bu16 } else { 0x10bu16 }).to_le_bytes(),
        );
        put(&mut f, oh + 16, &b.entry.to_le_bytes());
        if pe64 {
            put(&mut f, oh + 24, &b.image_base.to_le_bytes());
        } else {
            put(&mut f, oh + 28, &(b.image_base as u32).to_le_bytes());
        }
        put(&mut f, oh + 32, &SECTION_ALIGN.to_le_bytes());
        put(&mut f, oh + 36, &FILE_ALIGN.to_le_bytes());
        put(&mut f, oh + 40, &10u16.to_le_bytes()); // OS version 10.0
        put(&mut f, oh + 48, &10u16.to_le_bytes()); // subsystem version 10.0
        put(&mut f, oh + 56, &size_of_image.to_le_bytes());
        put(&mut f, oh + 60, &headers.to_le_bytes());
        put(&mut f, oh + 68, &1u16.to_le_bytes()); // IMAGE_SUBSYSTEM_NATIVE
        put(&mut f, oh + 70, &0x0140u16.to_le_bytes()); // DYNAMIC_BASE | NX_COMPAT
        let dd = if pe64 {
            put(&mut f, oh + 108, &16u32.to_le_bytes());
            oh + 112
        } else {
            put(&mut f, oh + 92, &16u32.to_le_bytes());
            oh + 96
        };
        for (i, (rva, size)) in dirs.iter().enumerate() {
            put(&mut f, dd + 8 * i, &rva.to_le_bytes());
            put(&mut f, dd + 8 * i + 4, &size.to_le_bytes());
        }
        let mut raw = headers;
        for (i, s) in b.sections.iter().enumerate() {
            let h = sec_table as usize + 40 * i;
            let mut name = [0u8; 8];
            for (d, c) in name.iter_mut().zip(s.name.bytes()) {
                *d = c;
            }
            put(&mut f, h, &name);
            put(&mut f, h + 8, &s.virtual_size.to_le_bytes());
            put(&mut f, h + 12, &s.rva.to_le_bytes());
            let raw_size = align(s.data.len() as u32, FILE_ALIGN);
            put(&mut f, h + 16, &raw_size.to_le_bytes());
            put(
                &mut f,
                h + 20,
                &(if raw_size == 0 { 0 } else { raw }).to_le_bytes(),
            );
            put(&mut f, h + 36, &s.characteristics.to_le_bytes());
            if raw_size != 0 {
                put(&mut f, raw as usize, &s.data);
                f.resize((raw + raw_size) as usize, 0);
                raw += raw_size;
            }
        }
        BuiltPe {
            file: f,
            iat,
            size_of_image,
        }
    }
}
