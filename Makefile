# Thin front door: every verb is an invoke task (tasks.py), after 'deps' has set things up.
PROFILE ?= qemu-test
PYTHON  ?= python3
VENV    := .venv
INVOKE  := $(VENV)/bin/invoke

# Host packages. mkosi comes from bookworm-backports: bookworm's own mkosi (14) lacks the options the build uses.
APT_PACKAGES := mkosi bubblewrap systemd-container qemu-system-x86 qemu-utils zstd e2fsprogs \
                cpio kmod debian-archive-keyring python3-venv shellcheck grub-common \
                ipxe dnsmasq-base nginx-light socat squashfs-tools cryptsetup-bin openssl xz-utils jq \
                iproute2 gpgv
BACKPORTS    := /etc/apt/sources.list.d/cbios-bookworm-backports.sources

.PHONY: deps deps-apt deps-python doctor image test test-unit test-vm bench clean distclean

deps: deps-apt deps-python

deps-apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -z "$$missing" ] && mkosi --version 2>/dev/null | grep -qE '^mkosi (2[4-9]|[3-9][0-9])'; then \
	    exit 0; fi; \
	set -e; \
	if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then \
	    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
	        "$$(grep -rhoE 'https?://[^ ]+/debian/?$$' /etc/apt/sources.list /etc/apt/sources.list.d/ \
	            2>/dev/null | head -n1 | grep . || echo http://deb.debian.org/debian)" \
	        /usr/share/keyrings/debian-archive-keyring.gpg > $(BACKPORTS); \
	fi; \
	apt-get update -q; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends -t bookworm-backports mkosi; \
	apt-get install -y -q --no-install-recommends $(APT_PACKAGES)

deps-python: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# What this host lacks for each verb, a line each with its fix (cbios/doctor.py).
doctor: deps-python
	$(INVOKE) doctor

image: deps
	$(INVOKE) disk --profile $(PROFILE)

test: deps
	$(INVOKE) test

test-unit: deps-python
	$(INVOKE) test --unit

bench: deps
	$(INVOKE) bench --profile $(PROFILE)

clean:
	rm -rf build

distclean: clean
	rm -rf .cache $(VENV)
