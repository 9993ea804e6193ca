/* Small helpers shared by every part of the agent: logging to the console,
 * the percent escaping used by the config, the manifest and the markers,
 * and whole-file reads. */
#ifndef VMIMG_UTIL_H
#define VMIMG_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Everything the agent says goes to this descriptor (the console). */
extern int g_console_fd;

/* A plain diagnostic line "vmimg-agent: ..." (not a marker). */
void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Decode %XX escapes in place. Returns the decoded length, or -1 when an
 * escape is malformed or decodes to NUL (values are C strings). */
long unescape(char *s);

/* Append `s` to `out` (capacity `cap`, NUL terminated) escaping every byte
 * outside 0x21..0x7e and '%' itself. Returns 0, or -1 when it does not fit;
 * `out` then holds as much as fit, still terminated. */
int escape_append(char *out, size_t cap, const char *s);

/* Read a whole file into a fresh NUL-terminated buffer. Returns NULL and sets
 * errno on failure; *len gets the length without the NUL. */
char *read_file(const char *path, size_t *len);

/* Write all of buf, retrying on short writes and EINTR. */
int write_all(int fd, const void *buf, size_t len);

/* Write a small file (created or truncated) with the given mode. */
int write_text_file(const char *path, const char *text, unsigned mode);

/* Parse a non-negative decimal number that must fill all of s. */
int parse_uint(const char *s, unsigned long long *out);

/* The value of one hex digit (either case), or -1. */
int hex_digit(char c);

/* Split the next line off *pos (its newline becomes NUL); NULL at the end. */
char *next_line(char **pos);

/* mkdir -p, mode 0755; failures are left for the caller's next step to meet. */
void make_dirs(const char *path);

/* The device node "/dev/NAME" of the entry NAME of `dir` (a sysfs class or
 * block directory) whose name starts with `prefix` and whose `attr` file
 * holds `want` (its first line). Returns 0, or -1 when none does. */
int find_device(const char *dir, const char *prefix, const char *attr, const char *want,
		char *dev, size_t len);

/* Microseconds since boot (CLOCK_BOOTTIME). */
uint64_t boot_us(void);

#endif
