//! The NBD wire constants, named as the protocol document names them. Nothing here
//! leaves the `nbd` module: the server converts to domain types at the edge.

// Handshake.
pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(super) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(super) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(super) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(super) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(super) const OPT_EXPORT_NAME: u32 = 1;
pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_LIST: u32 = 3;
pub(super) const OPT_INFO: u32 = 6;
pub(super) const OPT_GO: u32 = 7;
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(super) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(super) const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_SERVER: u32 = 2;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub(super) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(super) const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub(super) const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub(super) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub(super) const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub(super) const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of OPT_INFO/OPT_GO.
pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_NAME: u16 = 1;
pub(super) const INFO_DESCRIPTION: u16 = 2;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(super) const TF_HAS_FLAGS: u16 = 1 << 0;
pub(super) const TF_READ_ONLY: u16 = 1 << 1;
pub(super) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(super) const TF_SEND_FUA: u16 = 1 << 3;
pub(super) const TF_SEND_TRIM: u16 = 1 << 5;
pub(super) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(super) const TF_SEND_DF: u16 = 1 << 7;
pub(super) const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub(super) const TF_SEND_CACHE: u16 = 1 << 10;
pub(super) const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Requests.
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_FLUSH: u16 = 3;
pub(super) const CMD_TRIM: u16 = 4;
pub(super) const CMD_CACHE: u16 = 5;
pub(super) const CMD_WRITE_ZEROES: u16 = 6;
pub(super) const CMD_BLOCK_STATUS: u16 = 7;

pub(super) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(super) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(super) const CMD_FLAG_DF: u16 = 1 << 2;
pub(super) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(super) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Replies.
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(super) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(super) const REPLY_TYPE_NONE: u16 = 0;
pub(super) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Error values on the wire (not the host's errno numbers, though they coincide on Linux).
pub(super) const EPERM: u32 = 1;
pub(super) const EIO: u32 = 5;
pub(super) const ENOMEM: u32 = 12;
pub(super) const EINVAL: u32 = 22;
pub(super) const ENOSPC: u32 = 28;
pub(super) const EOVERFLOW: u32 = 75;
pub(super) const ENOTSUP: u32 = 95;
pub(super) const ESHUTDOWN: u32 = 108;

// base:allocation.
pub(super) const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` when a client selects it.
pub(super) const META_ID_BASE_ALLOCATION: u32 = 1;
pub(super) const STATE_HOLE: u32 = 1 << 0;
pub(super) const STATE_ZERO: u32 = 1 << 1;
