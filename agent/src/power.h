/* Ending the VM, and shutdown requests from the host that arrive as a key
 * press: QEMU's system_powerdown presses the ACPI power button, which the
 * kernel reports as KEY_POWER on an evdev node. */
#ifndef VMIMG_POWER_H
#define VMIMG_POWER_H

#include "cmdline.h"

/* Below sysfs: where the kernel shows ACPI when the firmware has it, and the
 * x86 kernel's reset method (Linux 5.11+). */
#define ACPI_SYSFS_DIR "firmware/acpi"
#define REBOOT_TYPE_FILE "kernel/reboot/type"
#define REBOOT_TYPE_TRIPLE "triple"

/* How power_off() ends the VM (vmimg.shutdown; auto until set), and whether
 * the command line set the kernel's reboot= (then its reset method stays). */
void power_configure(enum shutdown_method how, int kernel_reboot);

/* sync and end the VM; never returns. Power-off where the platform can power
 * off (ACPI on x86_64, PSCI on arm64), else a reboot: without ACPI the kernel
 * only halts on power-off and the VM would never end, while a reset is what
 * Firecracker (reboot=k, the i8042 reset) and QEMU with -no-reboot exit on.
 * Unless reboot= says otherwise, the x86 reset is a triple fault. */
void power_off(void) __attribute__((noreturn));

/* Fork a watcher of every /dev/input/event* node that sends SIGPWR to PID 1
 * on a power-button press (PID 1 forwards it to the workload as SIGTERM).
 * Does nothing when the guest has no input devices. */
void watch_power_button(void);

#endif
