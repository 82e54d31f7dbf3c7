"""Helpers of tools/boot_test.py: a cached Debian rootfs booted with systemd-nspawn."""
