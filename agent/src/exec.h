/* `vmimg exec`: a server, on the virtio-serial port named "vmimg.exec", that
 * runs processes in the running guest and carries their stdin, stdout,
 * stderr and exit code in frames (docs/agent.md, "Exec channel"). */
#ifndef VMIMG_EXEC_H
#define VMIMG_EXEC_H

#include "config.h"

#define EXEC_PORT_NAME "vmimg.exec"
#define VIRTIO_PORTS_DIR "/sys/class/virtio-ports"

/* Frame: a type byte, a big-endian 32-bit payload length, the payload. */
#define FRAME_HEADER 5
#define MAX_FRAME (1u << 20)
/* host -> guest. Every connection opens with the hello frame: 'H', length 12,
 * "vmimg-exec-1". Wherever it shows up in the stream, the server drops what came
 * before it and ends the session running: the host that sent it went away,
 * perhaps mid-frame, perhaps so quickly that the port never looked closed. */
#define FRAME_HELLO 'H'
#define HELLO "H\0\0\0\x0cvmimg-exec-1"
#define HELLO_LEN 17
#define FRAME_EXEC 'X'   /* a run config: arg (at least one), env, cwd, user, tty, stdin, rows, cols */
#define FRAME_STDIN 'I'  /* bytes for the process's stdin; empty: end of input */
#define FRAME_SIGNAL 'K' /* one byte: a signal number for the process group */
#define FRAME_WINSIZE 'W' /* rows and columns, big-endian 16 bits each */
/* guest -> host */
#define FRAME_STDOUT 'O'
#define FRAME_STDERR 'E'
#define FRAME_EXIT 'Q'  /* the exit code, big-endian 32 bits (128 + signal when killed) */
#define FRAME_ERROR 'F' /* a protocol error, as text; the session is over */

/* Fork the server when the guest has the port; `cfg` (the workload's user,
 * environment and directory) is what an exec request starts from. */
void exec_server_start(const struct config *cfg);

#endif
