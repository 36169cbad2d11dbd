"""Ed25519 signature verification (RFC 8032, section 5.1.7), in pure Python: where there is
no openssl (a field laptop with only python3), the manifest's signature is still checked.
Verification only: nothing here holds a secret, so speed and constant time do not matter.

Keys come as openssl writes them: PEM of a SubjectPublicKeyInfo (`openssl pkey -pubout`).
A key's fingerprint is the sha256 of that DER, which `openssl pkey -pubin -outform DER |
sha256sum` gives too."""

from __future__ import annotations

import base64
import binascii
import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # DER of an Ed25519 SubjectPublicKeyInfo, less the key
PEM_LABEL = "PUBLIC KEY"

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, xy = T/Z


def _add(p: Point, q: Point) -> Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % P
    b = (p[1] + p[0]) * (q[1] + q[0]) % P
    c = 2 * p[3] * q[3] * D % P
    d = 2 * p[2] * q[2] % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _multiply(scalar: int, p: Point) -> Point:
    out: Point = (0, 1, 1, 0)  # NEUTRAL
    while scalar:
        if scalar & 1:
            out = _add(out, p)
        p = _add(p, p)
        scalar >>= 1
    return out


def _equal(p: Point, q: Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % P == 0 and (p[1] * q[2] - q[1] * p[2]) % P == 0


def _decode(data: bytes) -> Point | None:
    """The point encoded in 32 bytes (RFC 8032, 5.1.3), or None: not one."""
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 == 0:
        if sign:
            return None
        return 0, y, 1, 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    if x & 1 != sign:
        x = P - x
    return x, y, 1, x * y % P


_BASE_Y = 4 * pow(5, -1, P) % P
BASE = _decode(_BASE_Y.to_bytes(32, "little"))


def _encode(p: Point) -> bytes:
    z = pow(p[2], -1, P)
    x, y = p[0] * z % P, p[1] * z % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


NEUTRAL: Point = (0, 1, 1, 0)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether SIGNATURE is PUBLIC's (32 bytes) Ed25519 signature of MESSAGE, as OpenSSL (on
    the node) decides it: S below L, and the encoding of [S]B - [k]A equal to R byte for byte
    (no cofactor). A key of small order, which any signature with R = [S]B would satisfy, is
    no key."""
    assert BASE is not None
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decode(public)
    s = int.from_bytes(signature[32:], "little")
    if a is None or s >= L or _equal(_multiply(8, a), NEUTRAL):
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % L
    minus_a = (P - a[0], a[1], a[2], P - a[3])
    return _encode(_add(_multiply(s, BASE), _multiply(k, minus_a))) == signature[:32]


def public_key_der(pem: str) -> bytes:
    """The DER of the Ed25519 public key in PEM; ValueError if it holds none."""
    begin, end = f"-----BEGIN {PEM_LABEL}-----", f"-----END {PEM_LABEL}-----"
    if begin not in pem or end not in pem:
        raise ValueError(f"not a PEM public key (no '{begin}')")
    body = pem.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except binascii.Error as e:
        raise ValueError(f"not a PEM public key ({e})") from None
    if len(der) != len(SPKI_PREFIX) + 32 or not der.startswith(SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key")
    return der


def pem(der: bytes) -> str:
    """The PEM of a public key's DER, as openssl writes it."""
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {PEM_LABEL}-----", *lines, f"-----END {PEM_LABEL}-----", ""])


def raw_key(der: bytes) -> bytes:
    """The 32 bytes of the key in an Ed25519 SubjectPublicKeyInfo."""
    return der[len(SPKI_PREFIX):]


def fingerprint(der: bytes) -> str:
    """What people compare: sha256 of the key's DER."""
    return "sha256:" + hashlib.sha256(der).hexdigest()
