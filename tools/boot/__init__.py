"""Helpers of tools/boot_test.py (a cached Debian rootfs booted with systemd-nspawn) and of
tools/arm64.py (an arm64 rootfs under QEMU user emulation)."""
