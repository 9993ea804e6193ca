/* Verify mode: compare the root tree with /.vmimg/manifest. */
#ifndef VMIMG_VERIFY_H
#define VMIMG_VERIFY_H

#include <stddef.h>

#define VERIFY_MAX_LISTED 10 /* problems listed one by one; the rest counted */
#define VERIFY_BIND_DIR "/dev/.vmimg-root"
#define AGENT_DIR "/.vmimg" /* not part of the image: skipped */

struct manifest;

/* Walk the tree at `root` (iteratively: any depth) and compare it with the
 * manifest: each entry's type, mode, owner, size, link target, device numbers
 * and, when deep, content; entries on disk but not listed are "unexpected",
 * listed but not met "missing". With see_mounts, what sits on another device
 * than the root is skipped. Prints the problem markers; returns the number of
 * problems, or -1 with a reason in err (unreadable root, out of memory). */
long verify_walk(const char *root, const struct manifest *m, int deep, int see_mounts, char *err,
		 size_t errlen);

/* Check every manifest entry (and look for entries the manifest lacks);
 * deep also hashes file content. Prints the problem and result markers.
 * Returns the number of problems, or -1 with a reason in err and errno set
 * (EIO: the root failed a read) when the manifest or the root is unreadable. */
long verify_tree(const char *manifest_path, int deep, char *err, size_t errlen);

#endif
