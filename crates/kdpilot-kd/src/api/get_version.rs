//! DbgKdGetVersionApi (0x3146): the reply carries DBGKD_GET_VERSION64 in the union.

use super::{number, Api, Manipulate};
use crate::version::GetVersion64;
use crate::{Arch, PayloadError};

/// GetVersion request. The union is empty in the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetVersion;

impl Api for GetVersion {
    const NUMBER: u32 = number::GET_VERSION;
    type Reply = GetVersion64;

    fn encode_request(&self, _arch: Arch) -> Manipulate {
        Manipulate::request(Self::NUMBER, 0)
    }

    fn decode_request(m: &Manipulate, _arch: Arch) -> Result<Self, PayloadError> {
        expect_api(m, Self::NUMBER)?;
        Ok(GetVersion)
    }

    fn encode_reply(&self, reply: &GetVersion64, _arch: Arch) -> Manipulate {
        let mut m = Manipulate::request(Self::NUMBER, 0);
        m.return_status = crate::wire::status::SUCCESS;
        m.body = reply.encode();
        m
    }

    fn decode_reply(&self, m: &Manipulate, _arch: Arch) -> Result<GetVersion64, PayloadError> {
        m.check(Self::NUMBER)?;
        GetVersion64::parse(&m.body)
    }
}

/// Error unless `m` is for `api` (used by every `decode_request`).
pub(crate) fn expect_api(m: &Manipulate, api: u32) -> Result<(), PayloadError> {
    if m.api == api {
        Ok(())
    } else {
        Err(PayloadError::WrongApi {
            expected: api,
            got: m.api,
        })
    }
}
