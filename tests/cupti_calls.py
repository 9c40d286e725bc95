"""CUPTI callbacks made by hand, through sync_guard's real C callback (``sg_callback``).

On a machine without CUDA the native model cannot be fed by CUPTI; these helpers call the same C
entry point CUPTI calls, with the parameter structs of the documented signatures, so the C code
under test is the one a GPU runs. Callback ids from FIRST_ID up are unused by CUPTI.
"""
from __future__ import annotations

import ctypes
import itertools

from sync_guard import native, pages

FIRST_ID = 4000
SUCCESS, NOT_READY = 0, 600


class CallbackData(ctypes.Structure):
    """``CUpti_CallbackData``."""

    _fields_ = [("callbackSite", ctypes.c_int), ("functionName", ctypes.c_char_p),
                ("functionParams", ctypes.c_void_p), ("functionReturnValue", ctypes.c_void_p),
                ("symbolName", ctypes.c_char_p), ("context", ctypes.c_void_p),
                ("contextUid", ctypes.c_uint32), ("correlationData", ctypes.c_void_p),
                ("correlationId", ctypes.c_uint32)]


class FakeCupti:
    """Registers made-up callback ids for real CUDA function names and calls them."""

    def __init__(self, names: dict[str, int]) -> None:
        """``names``: CUDA function name -> domain (native.RUNTIME or native.DRIVER)."""
        self.lib = pages.library()
        ids = itertools.count(FIRST_ID)
        listing = {domain: [] for domain in (native.RUNTIME, native.DRIVER)}
        self.cbid = {}
        for name, domain in names.items():
            self.cbid[name] = next(ids)
            listing[domain].append((self.cbid[name], name))
        rows, sync_names = native.callback_table(listing)
        for row in rows:
            self.lib.sg_set_callback(*row)
        self.domain = names
        self.hook = object.__new__(native._Hook)
        self.previous_names = list(pages.sync_names)
        pages.sync_names[:] = sync_names
        self.judge = native._JUDGE(self.hook._on_sync)
        self.lib.sg_set_judge(ctypes.cast(self.judge, ctypes.c_void_p))
        self.keep: list = []

    def close(self) -> None:
        for name, cbid in self.cbid.items():
            self.lib.sg_set_callback(self.domain[name], cbid, native.K_NONE, -1, -1)
        pages.sync_names[:] = self.previous_names
        real = native._hook   # a real hook installed in this process gets its judge back
        self.lib.sg_set_judge(ctypes.cast(real.judge, ctypes.c_void_p) if real else None)

    def _site(self, name: str, site: int, params: tuple, result: int) -> None:
        raw = (ctypes.c_uint64 * 8)(*params)
        status = ctypes.c_int(result)
        data = CallbackData(site, name.encode(), ctypes.addressof(raw), ctypes.addressof(status),
                            None, None, 0, None, 1)
        self.keep += [raw, status, data]
        self.lib.sg_callback(None, self.domain[name], self.cbid[name], ctypes.byref(data))

    def call(self, name: str, *params: int, result: int = SUCCESS, inner=None) -> None:
        """Entry, (a call it makes), exit: as CUPTI reports one API call."""
        self._site(name, native.API_ENTER, params, result)
        if inner is not None:
            inner()
        self._site(name, native.API_EXIT, params, result)
        self.keep.clear()
