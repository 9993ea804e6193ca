/* The tree manifest (/.vmimg/manifest), written by vmimg/agent.py: one line
 * per path of the image, for the verify mode. Format in docs/agent.md:
 *   vmimg-manifest 1
 *   <path> <type> <mode> <uid> <gid> <size> <major>:<minor> <sha256|-> <target|->
 * with path and target percent-escaped. */
#ifndef VMIMG_MANIFEST_H
#define VMIMG_MANIFEST_H

#include <stddef.h>

#define MANIFEST_MAGIC "vmimg-manifest"
#define MANIFEST_VERSION 1
#define MANIFEST_PATH "/.vmimg/manifest"
#define MANIFEST_FIELDS 9

/* Type letters, as in `find -printf %y`. */
#define MT_FILE 'f'
#define MT_DIR 'd'
#define MT_SYMLINK 'l'
#define MT_CHAR 'c'
#define MT_BLOCK 'b'
#define MT_FIFO 'p'
#define MT_SOCKET 's'

struct manifest_entry {
	char *path;
	char type;
	unsigned mode; /* permission bits, 07777 */
	unsigned uid, gid;
	unsigned long long size;
	unsigned rmajor, rminor;
	char *sha256; /* 64 hex digits for files, else NULL */
	char *target; /* symlink target, else NULL */
};

struct manifest {
	struct manifest_entry *entries; /* sorted by path (strcmp) after parsing */
	size_t n;
};

/* Parse `text` in place. Returns 0, or -1 with a one-line reason in err. */
int manifest_parse(char *text, struct manifest *m, char *err, size_t errlen);

/* The entry for `path`, or NULL (binary search). */
const struct manifest_entry *manifest_find(const struct manifest *m, const char *path);

void manifest_free(struct manifest *m);

#endif
