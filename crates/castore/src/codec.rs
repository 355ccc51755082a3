//! The canonical binary encoding shared by every stored record: LEB128 varints and
//! length-prefixed byte strings. Canonical means one value has exactly one encoding, so
//! equal records have equal digests.

use crate::Digest;

/// Appends values to a byte buffer.
#[derive(Default, Debug)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Writer {
        Writer::default()
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// Signed integers are zigzag-encoded so small negatives stay small.
    pub(crate) fn varint_signed(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub(crate) fn digest(&mut self, d: &Digest) {
        self.buf.extend_from_slice(&d.0);
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// The record could not be decoded; the caller names the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodeError;

/// Reads values written by [`Writer`], rejecting truncated or non-canonical input.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError)?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            // A final zero byte after the first would be a second encoding of the same value.
            if b == 0 && shift > 0 {
                return Err(DecodeError);
            }
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(DecodeError);
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError)
    }

    pub(crate) fn varint_signed(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError)?;
        self.take(n)
    }

    pub(crate) fn digest(&mut self) -> Result<Digest, DecodeError> {
        Ok(Digest::from_slice(self.take(32)?).expect("32 bytes"))
    }

    pub(crate) fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        let values = [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX];
        let mut w = Writer::new();
        for v in values {
            w.varint(v);
        }
        for v in [-1i64, 0, i64::MIN, i64::MAX] {
            w.varint_signed(v);
        }
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        for v in values {
            assert_eq!(r.varint().unwrap(), v);
        }
        for v in [-1i64, 0, i64::MIN, i64::MAX] {
            assert_eq!(r.varint_signed().unwrap(), v);
        }
        assert!(r.end().is_ok());
        // 0x80 0x00 is an overlong encoding of zero.
        assert!(Reader::new(&[0x80, 0x00]).varint().is_err());
        assert!(Reader::new(&[0x80]).varint().is_err());
        assert!(Reader::new(&[5, 1, 2]).bytes().is_err());
    }
}
