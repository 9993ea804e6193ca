/* Ending the VM, and shutdown requests from the host that arrive as a key
 * press: QEMU's system_powerdown presses the ACPI power button, which the
 * kernel reports as KEY_POWER on an evdev node. */
#ifndef VMIMG_POWER_H
#define VMIMG_POWER_H

#include "cmdline.h"

/* Where the kernel shows ACPI when the firmware has it. */
#define ACPI_SYSFS_DIR "firmware/acpi"

/* How power_off() ends the VM (vmimg.shutdown); auto until set. */
void power_set_method(enum shutdown_method how);

/* sync and end the VM; never returns. Power-off where the platform can power
 * off (ACPI on x86_64, PSCI on arm64), else a reboot: without ACPI the kernel
 * only halts on power-off and the VM would never end, while a reboot is what
 * Firecracker (reboot=k, the i8042 reset) and QEMU with -no-reboot exit on. */
void power_off(void) __attribute__((noreturn));

/* Fork a watcher of every /dev/input/event* node that sends SIGPWR to PID 1
 * on a power-button press (PID 1 forwards it to the workload as SIGTERM).
 * Does nothing when the guest has no input devices. */
void watch_power_button(void);

#endif
