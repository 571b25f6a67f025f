"""A minimal ICC v2 writer for tests: an RGB matrix/TRC ("display") profile of given primaries and gamma, as a
phone's Display P3 or a camera's Adobe RGB profile is. Pillow can create only sRGB, LAB and XYZ profiles, and no
other RGB profile is on the test machine, so a wide-gamut one is made from its bytes."""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
# The primaries of Display P3, adapted to D50 (the XYZ columns of its rXYZ, gXYZ, bXYZ tags, as Apple's profile has them).
DISPLAY_P3_D50 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
# sRGB's, adapted to D50 (those of littlecms' sRGB, the profile ImageCms.createProfile("sRGB") makes).
SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def s15fixed16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(s15fixed16(v) for v in xyz)


def gamma_tag(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)  # u8Fixed8, padded to 4 bytes


def text_description_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    # ASCII count and text, then an empty Unicode (language code, count) and ScriptCode (code, count, 67 bytes) part.
    body = b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + bytes(67)
    return body + bytes(-len(body) % 4)


def text_tag(text: str) -> bytes:
    body = b"text" + bytes(4) + text.encode("ascii") + b"\0"
    return body + bytes(-len(body) % 4)


def rgb_profile(description: str, primaries_d50=DISPLAY_P3_D50, gamma: float = 2.2) -> bytes:
    """The bytes of an ICC v2 monitor profile: RGB -> XYZ through one gamma curve per channel and the primaries' matrix."""
    trc = gamma_tag(gamma)
    tags = [(b"desc", text_description_tag(description)), (b"cprt", text_tag("test profile")), (b"wtpt", xyz_tag(D50)),
            (b"rXYZ", xyz_tag(primaries_d50[0])), (b"gXYZ", xyz_tag(primaries_d50[1])), (b"bXYZ", xyz_tag(primaries_d50[2])),
            (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]  # fmt: skip
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + b"RGB " + b"XYZ " + bytes(12) + b"acsp"
              + b"APPL" + bytes(4) + bytes(4) + bytes(4) + bytes(8) + struct.pack(">I", 0) + b"".join(s15fixed16(v) for v in D50)
              + b"lcms" + bytes(16) + bytes(28))  # fmt: skip
    assert len(header) == 128
    return header + table + data
