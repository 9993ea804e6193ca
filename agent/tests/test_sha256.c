/* SHA-256 against the FIPS 180-4 example vectors and a long input. */
#include <stdlib.h>

#include "check.h"
#include "sha256.h"

static void hex_of(const void *data, size_t len, size_t step, char out[65])
{
	struct sha256 s;
	uint8_t d[SHA256_DIGEST_LEN];
	sha256_init(&s);
	/* feed in uneven pieces to exercise the block buffering */
	for (size_t i = 0; i < len; i += step)
		sha256_update(&s, (const char *)data + i, len - i < step ? len - i : step);
	sha256_final(&s, d);
	sha256_hex(d, out);
}

int main(void)
{
	char hex[65];
	static const char two_block[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
	size_t steps[] = {1, 3, 63, 64, 65, 1000};
	for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
		hex_of("", 0, steps[i], hex);
		CHECK_STR(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
		hex_of("abc", 3, steps[i], hex);
		CHECK_STR(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
		hex_of(two_block, strlen(two_block), steps[i], hex);
		CHECK_STR(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
	}
	/* one million 'a' */
	char *a = malloc(1000000);
	memset(a, 'a', 1000000);
	hex_of(a, 1000000, 4096, hex);
	CHECK_STR(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
	/* 55, 56 and 64 bytes straddle the padding boundary */
	hex_of(a, 55, 55, hex);
	CHECK_STR(hex, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
	hex_of(a, 56, 56, hex);
	CHECK_STR(hex, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
	hex_of(a, 64, 64, hex);
	CHECK_STR(hex, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
	free(a);
	return check_done("sha256");
}
