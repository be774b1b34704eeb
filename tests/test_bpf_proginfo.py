"""bpf/proginfo.py: a loaded program's id, type, name, tag and maps, as the kernel reports them."""

from __future__ import annotations

import os

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.bpf.proginfo import loaded_program
from rusty_rail.engines.xdp.program import XdpProgram

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF needs root")

BPF_PROG_TYPE_XDP = 6


def test_the_balancers_program_describes_itself() -> None:
    with XdpProgram(table_size=251, conn_capacity=1024, max_services=1) as x:
        program = loaded_program(x.prog_fd)
        assert program.id == libbpf.prog_id(x.prog_fd) > 0
        assert (program.type, program.name) == (BPF_PROG_TYPE_XDP, "rr_balance")
        assert len(program.tag) == 16 and int(program.tag, 16) != 0
        names = set()
        for map_id in program.map_ids:
            fd = libbpf.lib.bpf_map_get_fd_by_id(map_id)
            assert fd >= 0, map_id
            try:
                names.add(libbpf.map_info(fd).name.decode())
            finally:
                os.close(fd)
        assert {"rr_conns", "rr_config", "rr_maglev"} <= names


def test_a_descriptor_that_is_no_program_is_an_os_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            loaded_program(r)
    finally:
        os.close(r)
        os.close(w)
