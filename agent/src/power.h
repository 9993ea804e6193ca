/* Shutdown requests from the host that arrive as a key press: QEMU's
 * system_powerdown presses the ACPI power button, which the kernel reports as
 * KEY_POWER on an evdev node. */
#ifndef VMIMG_POWER_H
#define VMIMG_POWER_H

/* Fork a watcher of every /dev/input/event* node that sends SIGPWR to PID 1
 * on a power-button press (PID 1 forwards it to the workload as SIGTERM).
 * Does nothing when the guest has no input devices. */
void watch_power_button(void);

#endif
