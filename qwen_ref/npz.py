"""`.npz` files that are the same bytes whenever the arrays are the same.

`np.savez` stamps each member with the current time, so two runs that agree bit for bit still
write different files. Here every member carries the zip format's earliest date instead, and
arrays are streamed into the archive (a 32K-token prompt's logits are ~20 GB: no second copy).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry
_ZIP64_LIMIT = (1 << 31) - 1 - 4096  # zipfile's limit, less room for the .npy header


def save_npz(path: Path | str, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write `arrays` as np.load reads them (`name.npy` members), with fixed timestamps."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in arrays.items():
            value = np.asanyarray(value)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            # zip64 fields only where a member needs them, as zipfile's writestr decides: small
            # archives then come out as they always have (the committed fixtures' bytes)
            with archive.open(info, "w", force_zip64=value.nbytes >= _ZIP64_LIMIT) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)
